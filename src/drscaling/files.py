"""Reading and writing the project's files safely.

Every output is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file that a later stage would trust. Readers are strict: a problem is reported with the
file and line number, never silently skipped.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import gzip
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from drscaling.errors import DrscalingError

# A write that fails for want of room: a full disk, a full quota, a file-size limit (RLIMIT_FSIZE).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NoRoomError(DrscalingError):
    """An output that could not be written for want of room, named, with what to do."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"could not write {path}: {reason} (disk full, or over a quota or file-size limit);"
                         f" {path} is left as it was: free some space and rerun")
        self.reason = reason


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories alike: whatever the block creates at the temporary path replaces
    `path` as a whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    except NoRoomError as exc:  # from a write nested in this one: name what the user asked for
        raise NoRoomError(path, exc.reason) from exc.__cause__
    except OSError as exc:
        if exc.errno in NO_ROOM:  # the temporary copy goes below: nothing partial under the final name
            raise NoRoomError(path, exc.strerror) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (.<name>.<random>.tmp) that atomic_path leaves in `folder` when its
    process is killed mid-write; returns them. Call it only while holding the folder's lock
    (folder_lock), so that none of them belongs to a live writer."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a file for writing that appears at `path` only once it is complete."""
    with atomic_path(path) as tmp:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as fh:
        fh.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, to_json(obj))


def to_json(obj: Any) -> str:
    """The text write_json writes: strict JSON (numpy scalars and arrays, paths as plain JSON)."""
    return dumps(obj, indent=2, sort_keys=True) + "\n"


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps for every file the project writes: strict JSON that any parser reads. NaN and
    Infinity are not JSON; a value that may legitimately be non-finite (a CE before any finite
    evaluation, an unfitted law's R²) is written as null by its producer (finite_or_null), so meeting
    one here is a bug, named with where it is."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default, **kwargs)
    except ValueError as exc:
        where: list[str] = []
        finite_or_null(copy.deepcopy(obj), replaced=where)  # only to name them: the same walk that replaces them
        if not where:
            raise
        raise ValueError(f"non-finite number(s) at {', '.join(where[:10])}: JSON has no NaN or Infinity"
                         " (write null instead)") from exc


def finite_or_null(obj: Any, where: str = "", replaced: list[str] | None = None) -> Any:
    """obj made strict JSON, in place where it is a dict or a list (so shared sub-objects stay shared):
    non-finite floats become None (their paths are appended to `replaced`), numpy scalars plain
    numbers, tuples and arrays lists, Paths strings. What a producer calls on numbers that may be
    non-finite for a reason (readers map null back, e.g. to NaN or "no best yet")."""
    replaced = replaced if replaced is not None else []
    if isinstance(obj, dict):
        for k in list(obj):
            obj[k] = finite_or_null(obj[k], f"{where}.{k}" if where else str(k), replaced)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = finite_or_null(v, f"{where}[{i}]", replaced)
        return obj
    if isinstance(obj, tuple):
        return finite_or_null(list(obj), where, replaced)
    if hasattr(obj, "tolist") and not isinstance(obj, (bool, int, float, str)):  # numpy arrays and scalars
        return finite_or_null(obj.tolist(), where, replaced)
    if isinstance(obj, float) and not math.isfinite(obj):
        replaced.append(where)
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def finite_copy(obj: Any) -> Any:
    """A deep copy of obj with non-finite numbers as null (finite_or_null): for records (an MLflow
    artifact, a measurement) whose producer cannot rule them out and must not fail for them."""
    return finite_or_null(copy.deepcopy(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path, what: str = "file", hint: str = "") -> Any:
    """The parsed file; a missing one is an error naming `what` and, when given, what to run (`hint`)."""
    path = Path(path)
    if not path.exists():
        raise DrscalingError(f"{what} not found: {path}" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DrscalingError(f"{path}: not valid JSON ({exc})") from exc


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def open_text(path: str | Path) -> IO[str]:
    """Open plain or gzipped text as strict UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DrscalingError(f"file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="\n")
    return open(path, encoding="utf-8", errors="strict", newline="\n")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line without newline); decoding and gzip errors name the file and line."""
    lineno = 0
    try:
        with open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):  # noqa: B007
                yield lineno, line.rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise DrscalingError(f"{path}: invalid UTF-8 near line {lineno + 1} ({exc.reason})") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise DrscalingError(
            f"{path}: corrupt or truncated gzip after line {lineno} ({exc})"
        ) from exc


def json_rows(path: str | Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file, given as (line number, text);
    every line must be a JSON object, and the file must hold one at least."""
    n = 0
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DrscalingError(f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError:
            raise DrscalingError(f"{path}: line {lineno} is not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict):
            raise DrscalingError(f"{path}: line {lineno} is not a JSON object (got {type(row).__name__})")
        n += 1
        yield lineno, row
    if not n:
        raise DrscalingError(f"{path}: file is empty (no JSON lines)")


def iter_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Stream a JSON-lines file row by row (blank lines skipped); every line must be an object holding
    the `required` keys, and the file must hold one at least."""
    for lineno, row in json_rows(path, iter_lines(path)):
        missing = [k for k in required if k not in row]
        if missing:
            raise DrscalingError(f"{path}: line {lineno} lacks the field(s) {', '.join(missing)}")
        yield row


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSON-lines file; every line must be an object holding the `required` keys."""
    return list(iter_jsonl(path, required))


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on `folder` (its `name` file) for the block; a second process that
    asks for the same folder is refused at once with a clear message instead of racing the first."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise DrscalingError(
                f"{folder} is in use by {holder} ({what}); wait for it to finish or use another output folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
