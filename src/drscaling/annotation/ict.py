"""The ict source: the Inverse Cloze Task (Lee et al. 2019): a sentence of a passage is its
pseudo-query. Deterministic given the seed, and free: no model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drscaling.annotation.bounds import AnnotationLimits
from drscaling.annotation.format import Annotations, write_annotations
from drscaling.annotation.human import positives
from drscaling.errors import DrscalingError

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
WRAPPED = re.compile(r"(?<!\n)\n(?!\n)")  # a single newline is line wrapping, not a break


def sentences(passage: str) -> list[str]:
    text = WRAPPED.sub(" ", passage)
    return [" ".join(s.split()) for s in SENTENCE_END.split(text) if len(s.strip()) >= 3]


def ict_pair(
    passage: str, rng: np.random.Generator, remove_prob: float, limits: AnnotationLimits
) -> tuple[str, str]:
    """Inverse Cloze Task: a random sentence is the pseudo-query; with `remove_prob` it is cut out
    of the passage (as in Lee et al. 2019), otherwise the passage keeps it. Only sentences within
    the query length limits are candidates (lists and tables make over-long 'sentences')."""
    sents = sentences(passage)
    fits = [i for i, s in enumerate(sents) if limits.min_query_chars <= len(s) <= limits.max_query_chars]
    if not fits:
        return "", passage
    i = fits[int(rng.integers(len(fits)))]
    query = sents[i]
    if len(sents) > 1 and rng.random() < remove_prob:
        passage = " ".join(s for j, s in enumerate(sents) if j != i)
    return query, passage


@dataclass(frozen=True)
class IctSettings:
    """params.yaml annotate.ict."""

    seed: int = 0
    remove_prob: float = 0.9  # how often the pseudo-query sentence is cut out of its passage (the ICT paper's 0.9)


def ict_annotations(
    prepared: str | Path, settings: IctSettings = IctSettings(), limits: AnnotationLimits | None = None,
) -> Annotations:
    """Deterministic given the seed. The passage a query points at stays the corpus passage (pid);
    the 'removed' variant is what the query was cut from, recorded for transparency. Free: no model."""
    seed, remove_prob = settings.seed, settings.remove_prob
    if not 0.0 <= remove_prob <= 1.0:
        raise DrscalingError(f"remove_prob must be in [0, 1] (got {remove_prob})")
    limits = limits or AnnotationLimits()
    pairs = positives(prepared)
    rng = np.random.default_rng(seed)
    rows = []
    for pid, passage in zip(pairs["pid"], pairs["passage"], strict=True):
        query, _ = ict_pair(passage, rng, remove_prob, limits)
        if not query or query.strip().lower() == passage.strip().lower():
            continue  # no usable sentence, or a one-sentence passage: no distinct pseudo-query
        rows.append({"qid": f"ict:{pid}", "pid": pid, "query": query})
    cost = {"source": "ict", "pairs": len(rows), "usd_per_pair": 0.0, "usd_total": 0.0,
            "priced_by": "heuristic, no model: free"}
    return Annotations(rows, cost)


def annotate_ict(prepared: str | Path, out: str | Path, settings: IctSettings = IctSettings()) -> dict:
    """ict_annotations written to `out` without the GX checks (test fixtures; the CLI publishes)."""
    return write_annotations(out, ict_annotations(prepared, settings))
