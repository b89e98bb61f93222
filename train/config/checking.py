"""The checking machinery every section shares: a type checker and the error it raises.

:func:`_check` checks one value against a field's annotation (an int is accepted where a float is
due, a list becomes a tuple, NaN and inf are refused); :class:`_Section` runs it on every field of
a frozen section, then the section's own ``_validate``. Every message names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Sequence, Union


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message says what to change."""


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The evaluated field annotations of a dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} {_type_name(args[0]) + 's' if len(set(args)) == 1 else 'values'}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


class _NotFiniteError(ConfigError):
    """A float field given NaN or inf."""


#: Float fields (dotted names) that accept +-inf; every other float must be finite.
FLOATS_ALLOWING_INF: frozenset[str] = frozenset()


def _check(value: Any, tp: Any, where: str) -> Any:
    """Returns ``value`` checked against ``tp`` (int -> float and list -> tuple are converted).

    Raises:
        ConfigError: If the value does not have the annotated type.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except _NotFiniteError:
                raise  # the right type, a bad value: say so rather than "must be float or none"
            except ConfigError:
                continue
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            # NaN compares false with every bound, so `lr <= 0` checks let it through (a NaN
            # grad_clip turned clipping off); inf is never a sensible setting either, except where
            # a field says so.
            if math.isnan(value) or (math.isinf(value) and where not in FLOATS_ALLOWING_INF):
                raise _NotFiniteError(f"{where} must be a finite number, got {value!r}")
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            raise ConfigError(f"{where} must be {_type_name(tp)}, got {len(value)} values: {list(value)!r}")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field annotated with a type this module does not know
        raise TypeError(f"{where}: unsupported annotation {tp!r}")
    got = "none" if value is None else type(value).__name__
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {got} {value!r}")


def _choice(where: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), list(choices), n=1)
        raise ConfigError(
            f"{where} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


class _Section:
    """Mix-in of the frozen sections: type check (with int->float, list->tuple), then validate.

    Subclasses set ``_SECTION`` (their dotted name, for messages) and override ``_validate``.
    """

    _SECTION = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            old = getattr(self, f.name)
            new = _check(old, hints[f.name], f"{self._SECTION}.{f.name}")
            if new is not old:
                object.__setattr__(self, f.name, new)  # normalising at construction, not mutation
        self._validate()

    def _fail(self, key: str, msg: str) -> None:
        raise ConfigError(f"{self._SECTION}.{key} {msg}")

    def _min(self, key: str, low: float, *, strict: bool = False) -> None:
        value = getattr(self, key)
        if value < low or (strict and value == low):
            self._fail(key, f"must be {'>' if strict else '>='} {low}, got {value!r}")

    def _enum(self, key: str, choices: Sequence[str]) -> None:
        _choice(f"{self._SECTION}.{key}", getattr(self, key), choices)

    def _validate(self) -> None:
        pass
