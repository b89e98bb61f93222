"""What a verb of the ``pfc`` tree is (:class:`Verb`), the shared ``--help`` layout, and
:class:`UsageError` (a verb's "these options do not go together", shown like argparse's errors)."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import dataclass
from typing import Callable


class UsageError(Exception):
    """Raised by a verb's ``run`` for options that parse but cannot work together: ``pfc``
    prints the verb's usage and ``pfc <verb>: error: <message>`` and exits 2, like argparse."""


@dataclass(frozen=True)
class Verb:
    """One ``pfc <name>`` sub-command.

    Attributes:
        name: The verb (``pfc <name>``).
        help: One line, listed by ``pfc --help``.
        description: The paragraph at the top of ``pfc <name> --help``.
        examples: Command lines shown under "examples:" at the bottom of ``pfc <name> --help``.
        add_arguments: Adds the verb's options, in titled argument groups, to a parser. Runs only
            for the verb being parsed (and in tests that walk the whole tree).
        run: Runs a parsed namespace; returns the exit code (raises :class:`UsageError` for
            options that cannot work together). Imports what is heavy.
    """

    name: str
    help: str
    description: str
    examples: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    @property
    def epilog(self) -> str:
        return "examples:\n" + "\n".join("  " + e for e in self.examples) if self.examples else ""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a multi-line text (the examples) keeps its lines and
    that option names are never split at their hyphens."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return textwrap.indent(text, indent)
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


def add_recipe_arguments(parser: argparse.ArgumentParser, title: str = "recipe"):
    """Adds ``--config/-c RECIPE`` and repeatable ``--set SECTION.KEY=VALUE`` (train.config's
    ``add_config_args``) as the argument group ``title``; returns the group."""
    from ..config import add_config_args

    group = parser.add_argument_group(title)
    add_config_args(group)
    return group
