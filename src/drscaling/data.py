"""The canonical dataset: corpus, queries and qrels per split, and the importers that produce it.

On disk a dataset is a folder with one sub-folder per split (train, dev, test), each holding
    corpus.jsonl   {"pid": str, "text": str}
    queries.jsonl  {"qid": str, "text": str}
    qrels.jsonl    {"qid": str, "pid": str}
Each split's corpus holds the passages its queries may be scored against; the test corpus is also
the pool contrastive-entropy negatives are drawn from.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, iter_lines, read_jsonl, write_jsonl

SPLITS = ("train", "dev", "test")
FILES = {"corpus": ("pid", "text"), "queries": ("qid", "text"), "qrels": ("qid", "pid")}


@dataclass
class Split:
    corpus: pd.DataFrame  # pid, text
    queries: pd.DataFrame  # qid, text
    qrels: pd.DataFrame  # qid, pid

    def pairs(self) -> pd.DataFrame:
        """(qid, query, pid, passage) for every qrel, in qrels order."""
        q = self.qrels.merge(self.queries.rename(columns={"text": "query"}), on="qid", how="left")
        return q.merge(self.corpus.rename(columns={"text": "passage"}), on="pid", how="left")


def load_split(root: str | Path, split: str) -> Split:
    folder = Path(root) / split
    if not folder.is_dir():
        raise DrscalingError(f"split '{split}' not found: {folder} (run `drscaling prepare` first)")
    frames = {
        name: pd.DataFrame(read_jsonl(folder / f"{name}.jsonl", cols), columns=list(cols)).astype(str)
        for name, cols in FILES.items()
    }
    return Split(**frames)


def save_dataset(splits: dict[str, Split], dest: str | Path) -> None:
    """Write all splits at once: `dest` appears complete or not at all."""
    written: dict[int, Path] = {}  # a frame shared by several splits is written once, then linked
    with atomic_path(dest) as tmp:
        for name, split in splits.items():
            for fname, cols in FILES.items():
                frame = getattr(split, fname)
                target = tmp / name / f"{fname}.jsonl"
                if id(frame) in written:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(written[id(frame)], target)
                    continue
                write_jsonl(target, frame[list(cols)].to_dict("records"))
                written[id(frame)] = target


def stable_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Splitting grouped pairs (Debian snapshot, plain pairs)
# ---------------------------------------------------------------------------------------------


def split_pairs(
    pairs: pd.DataFrame, dev_size: int, test_size: int, seed: int, group: str
) -> dict[str, Split]:
    """Split (qid, query, pid, passage, <group>) rows so that no group lands in two splits.

    Groups are shuffled with `seed`; dev and test take whole groups until they hold at least the
    requested number of pairs, the rest is train.
    """
    if dev_size < 1 or test_size < 1:
        raise DrscalingError(f"dev_size and test_size must be >= 1 (got {dev_size}, {test_size})")
    groups = np.array(sorted(pairs[group].unique()))
    if len(pairs) < dev_size + test_size + 1:
        raise DrscalingError(
            f"only {len(pairs)} pairs: too few for dev_size={dev_size} + test_size={test_size} + train"
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    sizes = pairs.groupby(group).size()
    assignment: dict[str, str] = {}
    counts = {"test": 0, "dev": 0}
    for g in groups:
        if counts["test"] < test_size:
            assignment[g] = "test"
            counts["test"] += int(sizes[g])
        elif counts["dev"] < dev_size:
            assignment[g] = "dev"
            counts["dev"] += int(sizes[g])
        else:
            assignment[g] = "train"
    which = pairs[group].map(assignment)
    out: dict[str, Split] = {}
    for name in SPLITS:
        part = pairs[which == name]
        out[name] = Split(
            corpus=part[["pid", "passage"]].drop_duplicates("pid").rename(columns={"passage": "text"}),
            queries=part[["qid", "query"]].drop_duplicates("qid").rename(columns={"query": "text"}),
            qrels=part[["qid", "pid"]].drop_duplicates(),
        )
    return out


def prepare_debian(raw: str | Path, dest: str | Path, dev_size: int, test_size: int, seed: int) -> dict:
    """Turn the Debian snapshot (one JSON line per package) into canonical train/dev/test splits."""
    rows = read_jsonl(raw, ("package", "source", "query", "passage"))
    pairs = pd.DataFrame(rows).astype(str)
    pairs["qid"] = "q:" + pairs["package"]
    pairs["pid"] = "p:" + pairs["package"]
    splits = split_pairs(pairs, dev_size, test_size, seed, group="source")
    save_dataset(splits, dest)
    return {name: len(s.qrels) for name, s in splits.items()}


def import_pairs(src: str | Path, dest: str | Path, dev_size: int, test_size: int, seed: int) -> dict:
    """Import JSON lines of {"query": ..., "passage": ...}; ids are content hashes, so re-imports agree."""
    rows = read_jsonl(src, ("query", "passage"))
    pairs = pd.DataFrame(rows)[["query", "passage"]]
    for col in ("query", "passage"):
        bad = pairs[~pairs[col].map(lambda v: isinstance(v, str) and bool(v.strip()))]
        if len(bad):
            raise DrscalingError(
                f"{src}: line {int(bad.index[0]) + 1} has an empty or non-string '{col}'"
                f" ({len(bad)} such line(s))"
            )
    pairs["qid"] = pairs["query"].map(lambda t: stable_id("q", t))
    pairs["pid"] = pairs["passage"].map(lambda t: stable_id("p", t))
    # A passage with several queries stays in one split, so group by passage.
    splits = split_pairs(pairs, dev_size, test_size, seed, group="pid")
    save_dataset(splits, dest)
    return {name: len(s.qrels) for name, s in splits.items()}


# ---------------------------------------------------------------------------------------------
# MS MARCO passage files
# ---------------------------------------------------------------------------------------------


def read_tsv(path: str | Path, ncols: int, names: tuple[str, ...]) -> pd.DataFrame:
    """Read a header-less TSV strictly: every line must have at least `ncols` fields."""
    rows = []
    for lineno, line in iter_lines(path):
        if not line:
            continue
        fields = next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(fields) < ncols:
            raise DrscalingError(
                f"{path}: line {lineno} has {len(fields)} tab-separated field(s), expected {ncols}"
                f" ({', '.join(names)})"
            )
        rows.append(fields[:ncols])
    if not rows:
        raise DrscalingError(f"{path}: file is empty")
    return pd.DataFrame(rows, columns=list(names))


def _find(src: Path, stem: str) -> Path | None:
    for candidate in (src / f"{stem}.tsv", src / f"{stem}.tsv.gz"):
        if candidate.exists():
            return candidate
    return None


def import_msmarco(src: str | Path, dest: str | Path) -> dict:
    """Import MS MARCO passage files: collection.tsv, queries.{split}.tsv, qrels.{split}.tsv.

    MS MARCO's split names map as train->train, dev->dev, eval/test->test; TREC-style qrels
    (qid 0 pid rel) and two-column qrels are both accepted. Every split shares the collection
    (hard-linked, not copied).
    """
    src = Path(src)
    collection = _find(src, "collection")
    if collection is None:
        raise DrscalingError(f"{src}: no collection.tsv(.gz) found")
    corpus = read_tsv(collection, 2, ("pid", "text"))
    splits: dict[str, Split] = {}
    for split, names in {"train": ("train",), "dev": ("dev",), "test": ("test", "eval")}.items():
        qfile = next((f for n in names if (f := _find(src, f"queries.{n}"))), None)
        rfile = next((f for n in names if (f := _find(src, f"qrels.{n}"))), None)
        if qfile is None or rfile is None:
            raise DrscalingError(f"{src}: missing queries.{names[0]}.tsv or qrels.{names[0]}.tsv")
        queries = read_tsv(qfile, 2, ("qid", "text"))
        qrels = _parse_qrels(rfile)
        qrels = qrels[qrels["qid"].isin(set(queries["qid"]))]
        queries = queries[queries["qid"].isin(set(qrels["qid"]))]
        splits[split] = Split(corpus=corpus, queries=queries, qrels=qrels)
    save_dataset(splits, dest)
    return {name: len(s.qrels) for name, s in splits.items()}


def _parse_qrels(path: Path) -> pd.DataFrame:
    rows = []
    for lineno, line in iter_lines(path):
        if not line:
            continue
        fields = line.split()
        if len(fields) == 4:  # TREC: qid iter pid rel
            if int(fields[3]) > 0:
                rows.append((fields[0], fields[2]))
        elif len(fields) == 2:
            rows.append((fields[0], fields[1]))
        else:
            raise DrscalingError(f"{path}: line {lineno} is neither 'qid pid' nor 'qid 0 pid rel'")
    if not rows:
        raise DrscalingError(f"{path}: no relevance judgements")
    return pd.DataFrame(rows, columns=["qid", "pid"]).drop_duplicates()
