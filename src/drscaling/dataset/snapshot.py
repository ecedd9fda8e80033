"""The Debian snapshot (data/debian/pairs.jsonl: one JSON line per package) split into canonical
train/dev/test by source package, so that no source package lands in two splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from drscaling.data import SPLITS, Split, save_dataset
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl


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

