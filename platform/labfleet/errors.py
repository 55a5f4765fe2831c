"""Errors that the command line turns into exit codes."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input, printed as `FILE: field.path: message`."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}" if self.path else f"{self.source}: {self.message}"


class SpecError(Exception):
    """Bad input: the command starts nothing, writes nothing and exits 2."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# C0 and C1 control characters (ESC starts terminal escapes and OSC-8 links) and the bidirectional
# overrides and isolates, which reorder what a terminal shows; newlines and tabs stay.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """Text from a user or a store (names, error messages, tags), safe to put in a rich console message:
    its markup brackets escaped, so that `ValueError("bad [/x]")` prints as written instead of raising
    MarkupError, and control characters shown as escapes instead of sent to the terminal."""
    from rich.markup import escape

    return escape(_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text)))
