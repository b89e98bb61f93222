"""Writing a config: nested plain data, TOML text (``tomli-w``) and a run's ``config.toml``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import tomli_w

from .derived import DerivedConfig
from .model import HeadSection
from .train_config import TrainConfig

RESOLVED_NAME = "config.toml"
DERIVED_NAME = "derived.toml"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as nested plain data (tuples become lists; optional unset keys are ``None``).

    A head whose class count is still to come (a :class:`HeadSection`) has no ``num_classes`` key,
    as in the recipe (run fingerprints of ``pfc ablate`` hash this dict). ``config_from_dict`` of
    the result equals ``cfg``.
    """
    def section(obj: Any) -> dict[str, Any]:
        return {
            f.name: section(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name))
            else _plain(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (isinstance(obj, HeadSection) and f.name == "num_classes")
        }

    return {f.name: section(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset keys are left out (and read back as unset)."""
    return {k: _without_none(v) if isinstance(v, Mapping) else v for k, v in table.items() if v is not None}


def dump_toml(cfg: Union[TrainConfig, Mapping[str, Any]], header: str = "") -> str:
    """Writes a config (or nested plain data) as TOML; ``None`` values are left out.

    Args:
        cfg: The config, or nested plain data.
        header: Optional comment lines put first (each prefixed with ``# ``).
    """
    data = config_to_dict(cfg) if isinstance(cfg, TrainConfig) else cfg
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    comment = "\n".join(lines) + "\n\n" if lines else ""
    return comment + tomli_w.dumps(_without_none(data))


def write_resolved(cfg: TrainConfig, run_dir: Union[str, os.PathLike], derived: Optional[DerivedConfig] = None) -> Path:
    """Writes ``config.toml`` (the full resolved config) into ``run_dir`` and returns its path.

    ``load_config(<run_dir>/config.toml)`` gives back an equal config. With ``derived``, the
    derived quantities go to a separate ``derived.toml`` (for reading only: they are never loaded
    back into a config).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_NAME
    header = ("Resolved configuration of this run (defaults and overrides applied).\n"
              "Reload with: train.config.load_config(\"<this file>\"); see docs/config.md.")
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(dump_toml(cfg, header=header), encoding="utf-8")
    os.replace(tmp, path)
    if derived is not None:
        (run_dir / DERIVED_NAME).write_text(
            dump_toml({"derived": dataclasses.asdict(derived)},
                      header="Derived from config.toml, the world size and the dataset size; not a recipe."),
            encoding="utf-8",
        )
    return path
