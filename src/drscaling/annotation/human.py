"""The human source: the dataset's own (query, passage) pairs of the train split. Those pairs'
passages are what every source annotates (`positives`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from drscaling.annotation.format import Annotations, write_annotations
from drscaling.data import load_split
from drscaling.design import HUMAN_USD_PER_PAIR


def positives(prepared: str | Path) -> pd.DataFrame:
    """The train split's (qid, query, pid, passage) human pairs: the passages every source annotates."""
    return load_split(prepared, "train").pairs()


def human_annotations(prepared: str | Path, usd_per_pair: float = HUMAN_USD_PER_PAIR) -> Annotations:
    """The dataset's own pairs, priced at a configured $ per pair (the paper's 0.6)."""
    rows = positives(prepared)[["qid", "pid", "query"]].to_dict("records")
    cost = {"source": "human", "pairs": len(rows), "usd_per_pair": usd_per_pair,
            "usd_total": usd_per_pair * len(rows), "priced_by": "configured $ per pair"}
    return Annotations(rows, cost)


def annotate_human(prepared: str | Path, out: str | Path, usd_per_pair: float = HUMAN_USD_PER_PAIR) -> dict:
    """human_annotations written to `out` without the GX checks (test fixtures; the CLI publishes)."""
    return write_annotations(out, human_annotations(prepared, usd_per_pair))
