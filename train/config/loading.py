"""Loading a config: recipes, ``--set`` overrides and nested plain data into a :class:`TrainConfig`.

Unknown sections and keys are errors with a "did you mean" suggestion, in files and in overrides
alike; :func:`add_config_args` / :func:`config_from_args` are the argparse side of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from .checking import ConfigError, _check, _hints, _is_optional
from .model import HeadSection, build_head
from .train_config import SECTIONS, TrainConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "cpu_demo"


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _all_keys() -> list[str]:
    """Every settable dotted key (for suggestions across sections)."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for name in _field_names(cls):
            if dataclasses.is_dataclass(hints[name]):
                walk(hints[name], f"{prefix}{name}.")
            else:
                out.append(f"{prefix}{name}")

    for section, cls in SECTIONS.items():
        walk(cls, f"{section}.")
    return out


def _unknown(kind: str, dotted: str, candidates: Sequence[str]) -> ConfigError:
    """An 'unknown key' error with the closest name in the same table, else anywhere."""
    prefix, _, name = dotted.rpartition(".")
    hint = [f"{prefix}.{c}" if prefix else c for c in difflib.get_close_matches(name, list(candidates), n=1)]
    if not hint and prefix:
        hint = [k for k in _all_keys() if k.rpartition(".")[2] == name][:1]
    msg = f"unknown {kind} {dotted!r}"
    if hint:
        return ConfigError(f"{msg} (did you mean {hint[0]!r}?)")
    return ConfigError(f"{msg}; known: {', '.join(candidates)}")


def _build_section(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path!r} must be a table ([{path}] with keys), got {type(data).__name__} {data!r}")
    names = _field_names(cls)
    for key in data:
        if key not in names:
            raise _unknown("key", f"{path}.{key}", names)
    if cls is HeadSection:
        return build_head(data)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, f"{path}.{key}")
        else:
            kwargs[key] = _check(value, tp, f"{path}.{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Builds a :class:`TrainConfig` from nested plain data (a parsed TOML document).

    Missing sections and keys take their defaults; ``None`` values mean "unset" for optional keys.

    Raises:
        ConfigError: For an unknown section or key, a value of the wrong type or an invalid value.
    """
    for section in data:
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS))
    kwargs = {}
    for section, cls in SECTIONS.items():
        if section in data:
            kwargs[section] = _build_section(cls, data[section], section)
    return TrainConfig(**kwargs)


def _parse_value(raw: str, tp: Any) -> Any:
    """An override's value: a TOML literal when it parses as one, else the bare string."""
    text = raw.strip()
    if _is_optional(tp) and text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    wants_str = tp is str or (_is_optional(tp) and str in typing.get_args(tp) and len(typing.get_args(tp)) == 2)
    if wants_str and not isinstance(value, str):
        return text  # e.g. run.name=2024 names a run "2024"
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of the nested ``data`` with ``section.key=value`` overrides applied.

    Raises:
        ConfigError: For a malformed override or an unknown section or key.
    """
    tree = _deep_copy(data)
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {text!r} must look like section.key=value (e.g. data.batch_size=64)")
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ConfigError(f"--set {text}: " + str(_unknown("section", parts[0], list(SECTIONS))))
        if len(parts) == 1:
            raise ConfigError(f"--set {text}: {parts[0]!r} is a section; set one of its keys, e.g. "
                              f"{parts[0]}.{_field_names(SECTIONS[parts[0]])[0]}=...")
        cls: type = SECTIONS[parts[0]]
        node = tree.setdefault(parts[0], {})
        for i, part in enumerate(parts[1:], start=1):
            path = ".".join(parts[: i + 1])
            names = _field_names(cls)
            if part not in names:
                raise ConfigError(f"--set {text}: " + str(_unknown("key", path, names)))
            tp = _hints(cls)[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(f"--set {text}: {path!r} is a section; set one of its keys, e.g. "
                                      f"{path}.{_field_names(tp)[0]}=...")
                if not isinstance(node.get(part, {}), dict):
                    raise ConfigError(f"{path!r} must be a table, got {node[part]!r}")
                node = node.setdefault(part, {})
                cls = tp
            elif not last:
                raise ConfigError(f"--set {text}: {path!r} is a key, not a section")
            else:
                node[part] = _parse_value(raw, tp)
    return tree


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``train/recipes/``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(path_or_name: Union[str, os.PathLike, None] = None) -> Path:
    """The file a recipe argument refers to: an existing file, else a shipped recipe's name.

    Raises:
        ConfigError: If neither exists (with the closest recipe name).
    """
    if path_or_name is None:
        path_or_name = DEFAULT_RECIPE
    path = Path(path_or_name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        shipped = RECIPES_DIR / f"{path.stem if path.suffix == '.toml' else path.name}.toml"
        if shipped.is_file():
            return shipped
        names = list_recipes()
        hint = difflib.get_close_matches(path.stem, names, n=1)
        raise ConfigError(f"no recipe file or shipped recipe named {str(path_or_name)!r}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; shipped recipes: {', '.join(names)}")
    raise ConfigError(f"recipe file {str(path)!r} does not exist")


def load_config(path_or_name: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads a TOML recipe, applies ``section.key=value`` overrides and builds the frozen config.

    Args:
        path_or_name: A TOML file, the name of a recipe in ``train/recipes/`` (e.g.
            ``"cpu_demo"``), or ``None`` for the default recipe (``cpu_demo``).
        overrides: ``"section.key=value"`` strings applied in order; values are TOML literals
            (``64``, ``1e-3``, ``true``, ``[1, 2]``, ``"text"``) or else bare strings (``cuda``);
            ``none`` unsets an optional key. Nested keys are dotted (``data.synth.identities=50``).

    Raises:
        ConfigError: For a missing recipe, invalid TOML, unknown sections or keys, wrong types or
            invalid values; the message names the file or the override.
    """
    path = recipe_path(path_or_name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    merged = apply_overrides(data, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as exc:
        where = f"{path} with --set {' --set '.join(overrides)}" if overrides else str(path)
        raise ConfigError(f"{where}: {exc}") from exc


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--config/-c RECIPE`` and repeatable ``--set section.key=value`` to ``parser``."""
    parser.add_argument(
        "-c", "--config", "--recipe", dest="config", default=None, metavar="RECIPE",
        help=f"TOML recipe file, or the name of a shipped recipe ({', '.join(list_recipes())}); "
             f"default: {DEFAULT_RECIPE}",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set data.batch_size=64 "
             "--set head.method=arcface; see docs/config.md",
    )
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Loads the config named by the arguments :func:`add_config_args` added."""
    return load_config(getattr(ns, "config", None), getattr(ns, "overrides", None) or ())
