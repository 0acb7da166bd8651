"""Errors for bad input data, and a counter for the `skip_bad=True` mode.

Data files are written by people and scripts, so they go wrong: a truncated JSON line, a
missing field, a stray binary byte. We either stop with an error that names the file and
line (so the user can fix it in seconds), or, when the caller asked to skip bad records,
count every skipped record and keep the first few reasons for a report at the end. Nothing
is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoseek.errors import InputError


class BadInputError(InputError):
    """A record in an input file that cannot be used; `line` is 1-based (None: the whole file)."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class BadInputStats:
    """How many bad records were skipped, with the first `keep` reasons for the report."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    keep: int = 5

    def add(self, error: BadInputError) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(error))

    def skip_or_raise(self, error: BadInputError, skip_bad: bool) -> None:
        """Count `error` when the caller skips bad records, else raise it."""
        if not skip_bad:
            raise error
        self.add(error)

    def report(self) -> str:
        """One line per kept reason, for printing when the run ends."""
        if self.count == 0:
            return "no bad input records"
        lines = [f"skipped {self.count} bad input record(s); first {len(self.examples)}:"]
        lines += [f"  {example}" for example in self.examples]
        return "\n".join(lines)
