"""JSON lines of {"query": ..., "passage": ...}: ids are content hashes, so re-imports agree.

Texts are kept exactly as given. Exact repeats of a (query, passage) pair and pairs whose query equals
its passage (ignoring surrounding white space) are dropped and counted in the report. A query with several
passages, or a passage with several queries, is kept whole in one split (see build.carve). Each split's
corpus is the passages of its own pairs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from drscaling.dataset.build import Collection, ImportReport, Source, build, check_destination
from drscaling.dataset.reading import check_text, format_hint, iter_jsonl
from drscaling.errors import DrscalingError


def stable_id(prefix: str, text: str) -> str:
    """A 64-bit content hash of `text` behind `prefix`: the same text gets the same id in every import."""
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def read_pairs(src: str | Path) -> Collection:
    src = Path(src)
    if src.is_dir():
        raise DrscalingError(
            f"{src}: is a folder; --format pairs reads one JSON-lines file of {{query, passage}}"
            + format_hint(src, "pairs")
        )
    queries: list[str] = []
    passages: list[str] = []
    lines: list[int] = []
    for lineno, row in iter_jsonl(src, "pairs file"):
        where = f"{src}: line {lineno}"
        missing = [k for k in ("query", "passage") if k not in row]
        if missing:
            found = ", ".join(sorted(row)[:6]) or "none"
            raise DrscalingError(
                f"{where} lacks the field(s) {', '.join(missing)} (its fields: {found})" + format_hint(src, "pairs")
            )
        for col in ("query", "passage"):
            if not isinstance(row[col], str) or not row[col].strip():
                raise DrscalingError(f"{where} has an empty or non-string '{col}'")
            check_text(row[col], where, col)
        queries.append(row["query"])
        passages.append(row["passage"])
        lines.append(lineno)
    pairs = pd.DataFrame({"query": queries, "passage": passages, "line": lines})
    notes: list[str] = []
    same = pairs["query"].str.strip() == pairs["passage"].str.strip()
    if same.any():
        notes.append(
            f"dropped {int(same.sum()):,} pair(s) whose query equals its passage (first at line"
            f" {int(pairs.loc[same, 'line'].iloc[0])}): nothing to learn from them"
        )
        pairs = pairs[~same]
    dup = pairs.duplicated(["query", "passage"])
    if dup.any():
        notes.append(
            f"dropped {int(dup.sum()):,} duplicate pair(s) (same query and passage as an earlier line; first"
            f" at line {int(pairs.loc[dup, 'line'].iloc[0])}); sizes count unique pairs"
        )
        pairs = pairs[~dup]
    if pairs.empty:
        raise DrscalingError(f"{src}: no usable pairs left ({'; '.join(notes)})")
    pairs["qid"] = pairs["query"].map(lambda t: stable_id("q", t))
    pairs["pid"] = pairs["passage"].map(lambda t: stable_id("p", t))
    for col, text in (("qid", "query"), ("pid", "passage")):
        clash = pairs.drop_duplicates([col, text]).duplicated(col)
        if clash.any():  # 64-bit content hashes: practically never, but ids must stay unique
            raise DrscalingError(f"{src}: two different {text} texts hash to the id {pairs[col][clash].iloc[0]}")
    corpus = pairs[["pid", "passage"]].drop_duplicates("pid").rename(columns={"passage": "text"})
    queries_df = pairs[["qid", "query"]].drop_duplicates("qid").rename(columns={"query": "text"})
    qrels = pairs[["qid", "pid"]].reset_index(drop=True)
    source = Source(name=str(src), queries=queries_df.reset_index(drop=True), qrels=qrels)
    return Collection(corpus=corpus.reset_index(drop=True), sources={"pairs": source}, shared_corpus=False, notes=notes)


def import_pairs(
    src: str | Path, dest: str | Path, dev_size: int | None, test_size: int | None, seed: int,
    defaults: dict[str, int] | None = None,
) -> ImportReport:
    """Import a pairs file; dev_size/test_size None choose sizes that fit the data (see build)."""
    check_destination(dest)
    coll = read_pairs(src)
    return build(coll, dict.fromkeys(("train", "dev", "test"), "pairs"), dest,
                 dev_size=dev_size, test_size=test_size, seed=seed, defaults=defaults)
