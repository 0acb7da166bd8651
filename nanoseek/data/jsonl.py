"""Reading JSONL files: the one reader of prompt files, RL rows, benchmarks, SFT conversations and text.

A file is read line by line as bytes and each line decoded on its own, so a large file is never held
whole and a stray byte costs its line, not the file. Every error names the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Literal

from nanoseek.data.errors import BadInputError
from nanoseek.errors import reading


def decode_line(raw: bytes, number: int) -> str:
    """UTF-8 text of one line, with a byte-order mark on line 1 and Windows line ends removed."""
    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    return line[:-2] + "\n" if line.endswith("\r\n") else line


def read_jsonl(path: str | os.PathLike, errors: Literal["raise", "yield"] = "raise") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file; line numbers are 1-based.

    A line that is not UTF-8 or not JSON is a BadInputError(path, line, why): raised, or with
    errors="yield" yielded in place of the value, for callers that skip bad lines (skip_bad) or
    report them with their own.
    """
    with reading(path):  # missing, a directory, unreadable: one line naming the file
        f = open(path, "rb")
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = decode_line(raw, number)
                if not line.strip():
                    continue  # blank lines hold no record
                value = json.loads(line)
            except UnicodeDecodeError as e:
                error = BadInputError(str(path), number, f"invalid UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                error = BadInputError(str(path), number, f"not valid JSON ({e.msg} at column {e.colno})")
            else:
                yield number, value
                continue
            if errors == "raise":
                raise error
            yield number, error
