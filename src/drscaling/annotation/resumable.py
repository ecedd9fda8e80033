"""Resumable generation: which passages to annotate, and a partial file that survives a kill.

Every finished batch is appended to <source>.partial.jsonl (flushed and fsynced), the run's settings
to <source>.partial.json; a run started again with the same settings skips what is done. A passage
is done only when it has a query: one whose output held no usable query, or whose request failed,
is recorded (its tokens and time count in the cost) but generated again by the next run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from drscaling.annotation.config import GenerationConfig, Generator, PartialBatchError, digest
from drscaling.annotation.format import companion
from drscaling.annotation.human import positives
from drscaling.annotation.parsing import parse_output, pick_query, valid_queries
from drscaling.annotation.prompts import PROMPTS
from drscaling.errors import DrscalingError
from drscaling.files import dumps, read_json, read_jsonl, write_json
from drscaling.signals import Terminated, sigterm_at_boundary

log = logging.getLogger(__name__)


class BatchStopped(DrscalingError):
    """A batch's generator failed part-way: `rows` are its partial-file rows (finished and failed)."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def target_passages(prepared: str | Path, limit: int | None, seed: int) -> pd.DataFrame:
    """The train split's positive passages (pid, passage) in a seeded order; the first `limit`.

    The order is a permutation of the sorted pids, so the first K of any run are the first K of a
    larger run with the same seed (what makes extending a subset resumable)."""
    pairs = positives(prepared)
    passages = pairs.drop_duplicates("pid").sort_values("pid")[["pid", "passage"]].reset_index(drop=True)
    passages = passages[passages["passage"].map(lambda t: isinstance(t, str) and bool(t.strip()))]
    if passages.empty:
        raise DrscalingError(f"{prepared}: the train split has no non-empty positive passages to annotate")
    order = np.random.default_rng(seed).permutation(len(passages))
    passages = passages.iloc[order].reset_index(drop=True)
    if limit is not None:
        if limit < 1:
            raise DrscalingError(f"limit must be >= 1 (got {limit})")
        passages = passages.iloc[:limit]
    return passages


def partial_path(out: str | Path) -> Path:
    return companion(out, ".partial.jsonl")


def settings_path(out: str | Path) -> Path:
    return partial_path(out).with_suffix(".json")


def read_partial(path: Path) -> list[dict]:
    """Rows of a partial file. A run killed mid-write leaves at most one cut-off last line: it is
    dropped and the file truncated to the last complete line, so appends stay well-formed."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a cut-off last line from an interrupted run", path)
        with open(path, "r+b") as fh:
            fh.truncate(end)
    try:  # the one JSON-lines reader: line numbers and the problem in its message
        return read_jsonl(path, required=("pid",))
    except DrscalingError as exc:
        raise DrscalingError(f"{exc}; delete the file (or pass --restart) to start over") from exc


def open_partial(out: Path, settings: dict, restart: bool) -> tuple[Path, list[dict]]:
    """The partial file and its rows, after checking it was made with these settings."""
    part, meta = partial_path(out), settings_path(out)
    if part.exists() and meta.exists() and not restart:
        old = read_json(meta, "partial-run settings")
        if old.get("fingerprint") != settings["fingerprint"]:
            changed = sorted(k for k in settings["settings"] if old.get("settings", {}).get(k) != settings["settings"][k])
            raise DrscalingError(
                f"{part} holds a partial run made with other settings ({', '.join(changed) or 'unknown'}); "
                "pass --restart (restart=True) to discard it, or go back to those settings to resume")
        return part, read_partial(part)
    if part.exists() and not restart and not meta.exists():
        raise DrscalingError(f"{part} exists without its settings file {meta.name}; pass --restart to discard it")
    part.unlink(missing_ok=True)
    write_json(meta, settings)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.touch()
    return part, []


def remove_partial(out: str | Path) -> None:
    partial_path(out).unlink(missing_ok=True)
    settings_path(out).unlink(missing_ok=True)


def _append(part: Path, rows: list[dict]) -> None:
    with open(part, "a", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def by_length(passages: pd.DataFrame) -> pd.DataFrame:
    """Shortest first, so a batch holds passages of similar length: padding to the longest prompt
    of a batch is wasted compute. Output order is restored from the seeded order afterwards."""
    return passages.iloc[np.argsort(passages["passage"].str.len().to_numpy(), kind="stable")]


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), size):
        yield frame.iloc[start:start + size]


def generate_batch(
    generator: Generator, batch: pd.DataFrame, prompt_kind: str, cfg: GenerationConfig, source: str
) -> list[dict]:
    """One partial-file row per passage: the picked query, or failed=True after the retries.

    When the generator fails part-way (PartialBatchError), raises BatchStopped with the rows so
    far: the finished passages, and the others failed with the error."""
    state = {pid: {"pid": pid, "candidates": [], "tokens_in": 0, "tokens_out": 0, "attempts": 0}
             for pid in batch["pid"]}
    texts = dict(zip(batch["pid"], batch["passage"], strict=True))
    pending = list(batch["pid"])
    started = time.perf_counter()
    error = None
    for attempt in range(cfg.max_retries + 1):
        if not pending or error:
            break
        pending, error = _attempt(generator, pending, texts, state, prompt_kind, cfg, attempt)
    seconds = (time.perf_counter() - started) / len(batch)  # wall time shared evenly by the batch
    rows = []
    for pid in batch["pid"]:
        s = state[pid] | {"seconds": seconds}
        if s["candidates"]:
            s.pop("last_output", None)
            s |= {"qid": f"{source}:{pid}", "query": pick_query(s["candidates"], pid, cfg.seed, cfg.pick)}
        else:
            s["failed"] = True
            if error is not None and "last_output" not in s:
                s["error"] = str(error)
        rows.append(s)
    if error is not None:
        raise BatchStopped(str(error), rows)
    return rows


def _attempt(generator: Generator, pending: list[str], texts: dict[str, str], state: dict[str, dict],
             prompt_kind: str, cfg: GenerationConfig, attempt: int) -> tuple[list[str], Exception | None]:
    """One try at the pending passages: (those still without a usable query, the generator's error)."""
    template = PROMPTS[prompt_kind]
    prompts = [template.format(passage=generator.truncate(texts[p], cfg.max_passage_tokens)) for p in pending]
    seed = int(digest([cfg.seed, attempt, pending[0]]), 16) % 2**31
    error = None
    try:
        outputs = generator.complete(prompts, sample=cfg.do_sample or attempt > 0, seed=seed)
    except PartialBatchError as exc:
        outputs, error = [exc.done.get(i) for i in range(len(pending))], exc
    still = []
    for pid, comp in zip(pending, outputs, strict=True):
        if comp is None:  # its request failed: no output to judge
            still.append(pid)
            continue
        s = state[pid]
        s["tokens_in"] += comp.tokens_in
        s["tokens_out"] += comp.tokens_out
        s["attempts"] += 1
        s["candidates"] = valid_queries(parse_output(comp.text, prompt_kind), texts[pid], cfg.limits, cfg.copy_min_words)
        if not s["candidates"]:
            s["last_output"] = comp.text[:500]
            still.append(pid)
    return still, error


def run_generation(
    source: str, passages: pd.DataFrame, out: str | Path, generator: Generator, prompt_kind: str,
    cfg: GenerationConfig, settings: dict,
) -> tuple[list[dict], dict]:
    """Generate for every passage the partial file does not hold a query for; (rows, totals).

    Rows are in `passages` order and cover it exactly once (the latest row of each passage); the
    totals count every row recorded for these passages, failed tries included. The partial file is
    left for the caller to remove once the final output is in place."""
    part, history = open_partial(Path(out), settings, cfg.restart)
    wanted = set(passages["pid"])
    history = [r for r in history if r["pid"] in wanted]
    latest = {r["pid"]: r for r in history}
    todo = by_length(passages[~passages["pid"].map(lambda p: p in latest and not latest[p].get("failed"))])
    resumed = len(passages) - len(todo)
    if history:
        log.info("resuming %s: %d of %d passages already done", part, resumed, len(passages))
    session_start = time.perf_counter()
    # SIGTERM waits for the batch in flight (its requests are paid for), saves it, then stops: a rerun asks none again.
    with tqdm(total=len(passages), initial=resumed, desc=f"generate {source}", unit="passage") as bar, \
            sigterm_at_boundary() as term:
        for batch in _batches(todo, max(1, cfg.batch_size)):
            _stop_if_asked(term, latest, len(passages), part)
            try:
                rows = generate_batch(generator, batch, prompt_kind, cfg, source)
            except BatchStopped as exc:
                _append(part, exc.rows)  # the finished passages of the batch are kept
                kept = sum(1 for r in [*history, *exc.rows] if not r.get("failed"))
                raise DrscalingError(
                    f"{exc}\n{kept} passage(s) with a query are saved in {part}; running the same command "
                    "again resumes there and retries the failed ones") from None
            _append(part, rows)  # durable before it counts as done
            history += rows
            latest.update((r["pid"], r) for r in rows)
            bar.update(len(batch))
            bar.set_postfix(kept=sum(1 for r in latest.values() if not r.get("failed")))
        _stop_if_asked(term, latest, len(passages), part)  # during the last batch: saved, stopped before publishing
    rows = [latest[p] for p in passages["pid"]]
    return rows, _totals(rows, history, resumed, time.perf_counter() - session_start)


def _stop_if_asked(term: dict, latest: dict[str, dict], total: int, part: Path) -> None:
    """At a batch boundary, a SIGTERM received during the batch stops the run, naming what is saved."""
    if term["term"]:
        kept = sum(1 for r in latest.values() if not r.get("failed"))
        raise Terminated(f"SIGTERM: {kept} of {total} passages have a query, saved in {part};"
                         " running the same command again resumes there")


def _totals(rows: list[dict], history: list[dict], resumed: int, session_seconds: float) -> dict:
    return {
        "passages": len(rows),
        "passages_resumed": resumed,
        "queries_kept": sum(1 for r in rows if not r.get("failed")),
        "passages_failed": sum(1 for r in rows if r.get("failed")),
        "attempts": sum(r["attempts"] for r in history),
        "tokens_in": sum(r["tokens_in"] for r in history),
        "tokens_out": sum(r["tokens_out"] for r in history),
        "generation_seconds": sum(r["seconds"] for r in history),  # includes resumed segments
        "session_wall_seconds": session_seconds,
    }
