"""Generates docs/config.md from ``docs_template.md`` and the docstrings of the sections.

Run ``python -m train.config.docs > docs/config.md`` after changing a section; the test
``test_docs_config_md_is_generated`` fails while the committed file is stale. Each section's table
comes from its class: the key and type from the field's annotation, the default from the field,
the meaning from the ``Attributes:`` entry of the class docstring, and the paragraph above the
table from the docstring's body.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Optional

from .checking import _hints, _is_union
from .train_config import SECTIONS

TEMPLATE = Path(__file__).with_name("docs_template.md")
PLACEHOLDER = "<!-- SECTIONS -->"


def _markdown(text: str) -> str:
    """Docstring (reST) markup as Markdown: ``x`` and :role:`x` become `x`."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _type(tp: Any) -> str:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return " \\| ".join(_type(a) for a in args) + (", optional" if optional else "")
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_type(args[0])}]"
        return "[" + ", ".join(_type(a) for a in args) + "]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(repr(v) for v in value) + "]`"
    return f"`{value!r}`"


def _docstring_parts(cls: type) -> tuple[str, dict[str, str]]:
    """The docstring's body (without its summary line) and its ``Attributes:`` entries."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    body, _, attributes = doc.partition("\nAttributes:\n")
    body = "\n".join(body.split("\n")[1:]).strip()
    entries: dict[str, str] = {}
    name: Optional[str] = None
    for line in attributes.split("\n"):
        m = re.match(r"^ {4}(\w+): (.*)$", line)
        if m:
            name, entries[m.group(1)] = m.group(1), m.group(2)
        elif name and line.startswith(" " * 8):
            entries[name] += " " + line.strip()
    return body, entries


def section_markdown(name: str, cls: type) -> list[str]:
    """The ``### [name]`` heading, paragraph and key table of one section (nested tables after)."""
    body, entries = _docstring_parts(cls)
    hints = _hints(cls)
    out = [f"### `[{name}]`", ""]
    if body:
        out += [_markdown(body), ""]
    out += ["| Key | Type | Default | Meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            nested.append((f"{name}.{f.name}", hints[f.name]))
            continue
        if f.name not in entries:
            raise ValueError(f"{cls.__name__}.{f.name} has no entry under Attributes: in its docstring")
        meaning = _markdown(entries[f.name]).replace("|", "\\|")
        out.append(f"| `{f.name}` | {_type(hints[f.name])} | {_default(f)} | {meaning} |")
    out.append("")
    for sub_name, sub_cls in nested:
        out += section_markdown(sub_name, sub_cls)
    return out


def render() -> str:
    """The text of docs/config.md."""
    lines: list[str] = []
    for name, cls in SECTIONS.items():
        lines += section_markdown(name, cls)
    template = TEMPLATE.read_text(encoding="utf-8")
    return template.replace(PLACEHOLDER + "\n", "\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    """Prints docs/config.md (``python -m train.config.docs > docs/config.md``)."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
