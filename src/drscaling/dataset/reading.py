"""Strict readers for imported files: every problem names the file, the line and what is wrong.

Lines are split on b"\\n" and decoded one at a time, so invalid UTF-8 is reported on the line that holds
it (a buffered text reader reports the start of its buffer instead). A file starting with the gzip magic
bytes is read through gzip whatever its name. A folder, a missing file or an unreadable file each get
their own message, never "corrupt gzip".
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drscaling.errors import DrscalingError
from drscaling.files import json_rows

GZIP_MAGIC = b"\x1f\x8b"


def readable_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a readable regular file, else a DrscalingError that says what it is instead."""
    path = Path(path)
    if not path.exists():
        raise DrscalingError(f"{what} not found: {path}")
    if path.is_dir():
        raise DrscalingError(f"{path}: is a folder, expected a {what}")
    if not os.access(path, os.R_OK):
        raise DrscalingError(f"{path}: cannot be read (permission denied)")
    return path


def iter_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """Yield (line number, line without its newline) of a plain or gzipped UTF-8 text file."""
    path = readable_file(path, what)
    lineno = 0
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below; errors while opening are reported
    except OSError as exc:
        raise DrscalingError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    with raw:
        try:
            gz = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
        except OSError as exc:
            raise DrscalingError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        if path.suffix == ".gz" and not gz:
            raise DrscalingError(f"{path}: named .gz but is not gzip-compressed")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        try:
            for lineno, data in enumerate(stream, start=1):  # noqa: B007 - used in the messages
                if data.endswith(b"\n"):
                    data = data[:-1]
                if data.endswith(b"\r"):
                    data = data[:-1]
                if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    data = data[3:]
                try:
                    text = data.decode("utf-8", errors="strict")
                except UnicodeDecodeError as exc:
                    raise DrscalingError(
                        f"{path}: line {lineno}: invalid UTF-8 at byte {exc.start + 1} of the line"
                        f" ({exc.reason}: {data[exc.start:exc.start + 4]!r})"
                    ) from None
                yield lineno, text
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DrscalingError(f"{path}: corrupt or truncated gzip data after line {lineno} ({exc})") from exc
        except OSError as exc:
            raise DrscalingError(f"{path}: read error after line {lineno} ({exc.strerror or exc})") from exc


def check_text(value: Any, where: str, field: str, *, allow_blank: bool = False) -> str:
    """`value` if it is a string that UTF-8 can encode (no lone surrogate) and, unless allowed, not blank."""
    if not isinstance(value, str):
        raise DrscalingError(f"{where}: '{field}' is {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DrscalingError(
            f"{where}: '{field}' holds a lone surrogate (\\u{ord(value[exc.start]):04x} at character"
            f" {exc.start + 1}), which is not valid Unicode text"
        ) from None
    if not allow_blank and not value.strip():
        raise DrscalingError(f"{where}: '{field}' is empty")
    return value


def check_id(value: Any, where: str, field: str) -> str:
    """An id as a string: strings and integers are accepted (JSON files use both), nothing else."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DrscalingError(f"{where}: '{field}' is {type(value).__name__}, expected a string or an integer")
    return check_text(str(value), where, field)


def iter_jsonl(path: str | Path, what: str = "JSON-lines file") -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; each must be a JSON object."""
    return json_rows(path, iter_lines(path, what))


def sniff(path: str | Path) -> str | None:
    """The import format `path` looks like ('pairs', 'beir', 'beir-file', 'msmarco'), or None.

    Only used to make error messages say which --format to use; never to choose one silently.
    """
    path = Path(path)
    try:
        if path.is_dir():
            names = {p.name for p in path.iterdir()}
            if {"corpus.jsonl", "queries.jsonl"} <= names or "corpus.jsonl.gz" in names:
                return "beir"
            if "collection.tsv" in names or "collection.tsv.gz" in names:
                return "msmarco"
            return None
        for _, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return "msmarco" if "\t" in line else None
            if isinstance(row, dict):
                if "query" in row and "passage" in row:
                    return "pairs"
                if "_id" in row:
                    return "beir-file"
            return None
    except (DrscalingError, OSError):
        return None
    return None


HINTS = {
    "pairs": "it looks like JSON lines of {query, passage}: use --format pairs",
    "beir": "it looks like a BEIR folder (corpus.jsonl, queries.jsonl, qrels/): use --format beir",
    "beir-file": "it looks like a file of a BEIR folder (lines with _id): pass the folder with --format beir",
    "msmarco": "it looks like MS MARCO TSV data (collection.tsv, queries.*.tsv): use --format msmarco",
}


def format_hint(path: str | Path, expected: str) -> str:
    """'; <what it looks like>' when `path` looks like another format than `expected`, else ''."""
    found = sniff(path)
    if found is None or found == expected:
        return ""
    return "; " + HINTS[found]
