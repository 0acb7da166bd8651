"""Stream text documents from .txt, .jsonl and .parquet files without loading a file whole.

- .txt: documents are separated by one or more blank lines; read line by line.
- .jsonl: one JSON object per line, the document in `text_field` (default "text").
- .parquet: the `text_field` column, one row group at a time.

A directory stands for the supported files under it, in sorted order. A bad record (malformed
JSON, a missing or non-string field, invalid UTF-8, an empty file) raises `BadInputError` naming
the file and line (the 1-based row, for parquet); with `skip_bad=True` it is skipped and counted in `stats`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanoseek.data.errors import BadInputError, BadInputStats
from nanoseek.data.jsonl import decode_line, read_jsonl
from nanoseek.errors import missing

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, plus the supported files found under directories named, in a stable order."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise BadInputError(str(path), None, f"directory has no {'/'.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise BadInputError(str(path), None, f"unsupported file type; expected {'/'.join(SUFFIXES)}")
            files.append(path)
        else:
            raise missing(path)
    return files


def _txt_documents(path: Path, skip_bad: bool, stats: BadInputStats) -> Iterator[str]:
    lines: list[str] = []
    documents = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = decode_line(raw, number)
            except UnicodeDecodeError as e:
                error = BadInputError(str(path), number, f"invalid UTF-8 ({e.reason} at byte {e.start}); line dropped")
                stats.skip_or_raise(error, skip_bad)
                continue
            if line.strip():
                lines.append(line)
            elif lines:
                documents += 1
                yield "".join(lines).rstrip("\n")
                lines = []
    if lines:
        documents += 1
        yield "".join(lines).rstrip("\n")
    if not documents:
        stats.skip_or_raise(BadInputError(str(path), None, "empty file (no text)"), skip_bad)


def _jsonl_documents(path: Path, field: str, skip_bad: bool, stats: BadInputStats) -> Iterator[str]:
    any_line = False
    for number, record in read_jsonl(path, errors="yield"):
        any_line = True
        reason = record.reason if isinstance(record, BadInputError) else _field_problem(record, field)
        if reason:
            stats.skip_or_raise(BadInputError(str(path), number, reason), skip_bad)
            continue
        yield record[field]
    if not any_line:
        stats.skip_or_raise(BadInputError(str(path), None, "empty file (no JSON lines)"), skip_bad)


def _parquet_documents(path: Path, field: str, skip_bad: bool, stats: BadInputStats) -> Iterator[str]:
    import pyarrow.parquet as pq  # here: only parquet files pay its import (~0.1 s)

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        stats.skip_or_raise(BadInputError(str(path), None, f"cannot read as parquet: {e}"), skip_bad)
        return
    if field not in parquet.schema_arrow.names:
        reason = f"no column {field!r}; columns: {parquet.schema_arrow.names}"
        stats.skip_or_raise(BadInputError(str(path), None, reason), skip_bad)
        return
    if parquet.metadata.num_rows == 0:
        stats.skip_or_raise(BadInputError(str(path), None, "empty file (no rows)"), skip_bad)
        return
    row = 0
    for group in range(parquet.num_row_groups):
        for value in parquet.read_row_group(group, columns=[field]).column(0).to_pylist():
            row += 1
            reason = _field_problem({field: value}, field)
            if reason:
                stats.skip_or_raise(BadInputError(str(path), row, reason), skip_bad)
                continue
            yield value


def _field_problem(record: object, field: str) -> str | None:
    """Why `record[field]` is not a usable document, or None if it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if field not in record:
        return f"missing field {field!r}"
    value = record[field]
    if not isinstance(value, str):
        return f"field {field!r} is {type(value).__name__}, not a string"
    if not value.strip():
        return f"field {field!r} is empty"
    return None


def iter_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    text_field: str = "text",
    skip_bad: bool = False,
    stats: BadInputStats | None = None,
) -> Iterator[str]:
    """Yield every document of every file, in order.

    With `skip_bad`, bad records are counted in `stats` (pass one to print its `report()` at the
    end); if no `stats` is given, a summary goes to stderr when the iteration finishes.
    """
    own_stats = stats is None
    stats = BadInputStats() if stats is None else stats
    for path in expand_paths(paths):
        if path.suffix == ".txt":
            yield from _txt_documents(path, skip_bad, stats)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field, skip_bad, stats)
        else:
            yield from _parquet_documents(path, text_field, skip_bad, stats)
    if own_stats and stats.count:
        print(stats.report(), file=sys.stderr)
