"""Errors raised while reading a spec: each one knows where in the file it happened."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mark:
    """A 1-based position in a spec file."""

    file: str
    line: int
    col: int

    def shifted(self, line: int = 0, col: int = 0) -> "Mark":
        return Mark(self.file, self.line + line, self.col + col)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class SpecError(Exception):
    """A problem in a spec; `str()` is one line: `file:line:col: message`."""

    def __init__(self, mark: Mark | None, message: str):
        self.mark = mark
        self.message = one_line(message)
        super().__init__(f"{one_line(str(mark))}: {self.message}" if mark else self.message)


def one_line(text: str) -> str:
    """Text quoted from a spec (or its file name) made printable on one line: control
    characters, line breaks and lone surrogates written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)
