"""The project's own error type: a failure the user can fix (bad input, a missing file, a bad setting,
a corrupt checkpoint or tokenizer, an unknown name). `nanoseek` prints it as one line,
`error: <what>: <why>`, and exits 2; any other exception is a bug and keeps its traceback.

A leaf module (standard library only), so every layer can raise these.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An expected failure, caused by what the user gave; its message names the file, line or field."""


class InputError(UserError, ValueError):
    """A value, setting or file content that cannot be used (a ValueError, for callers that catch those)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or directory the user named that does not exist (a FileNotFoundError too)."""


def missing(path: object, what: str = "no such file or directory") -> MissingPathError:
    """The error for a user-given path that is not there (or, `what`, not what it should be)."""
    return MissingPathError(f"{path}: {what}")


@contextmanager
def reading(path: object) -> Iterator[None]:
    """Inside, reading the user's file `path`: OS and decoding errors become one line naming it.

    A missing file says it is missing, an unreadable one that it is unreadable, a directory that it is one."""
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError:
        raise missing(path) from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a file") from None
    except PermissionError:
        raise InputError(f"{path}: unreadable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def unknown(what: str, name: object, known: list[str] | tuple[str, ...]) -> InputError:
    """'unknown task 'arithmatic' (did you mean 'arithmetic'?); known: ...': an unknown name, with the nearest."""
    import difflib

    near = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return InputError(f"unknown {what} {name!r}{hint}; known: {', '.join(map(str, known))}")


def check_file(path: object, what: str = "") -> None:
    """A user-given path that must be an existing file: else one line naming it (`what`: the option, the setting)."""
    from pathlib import Path

    named = f" ({what})" if what else ""
    if Path(str(path)).is_dir():
        raise InputError(f"{path}: is a directory, expected a file{named}")
    if not Path(str(path)).exists():
        raise missing(path, f"no such file{named}")


@contextmanager
def as_user_error() -> Iterator[None]:
    """Inside, a ValueError or OSError is about what the user gave (a flag a library function checks, a file
    it opens): re-raised as an InputError for the one-line report. Only for code that reads user input."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as e:
        raise InputError(str(e)) from None


def read_json(path: str | Path, error: type[InputError] = InputError, *, expect_object: bool = True) -> Any:
    """The JSON value in the user's file `path` (a JSON object unless `expect_object` is False), or one line
    naming the file, the line and what is wrong, raised as `error`."""
    with reading(path):
        text = Path(path).read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if expect_object and not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value
