"""The one user-facing error type.

A ``MrplabError`` means the user gave mrplab something it cannot use (a config
key, a file, a value). The CLI prints ``error: <what> (<how to fix>)`` and
exits with status 2; anything else escaping is an internal bug.
"""

from __future__ import annotations


class MrplabError(Exception):
    """A user mistake: what is wrong and how to fix it, in one line."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.what} ({self.fix})" if self.fix else self.what
