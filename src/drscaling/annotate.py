"""Annotation sources: the training pairs a model learns from (paper section 4.3).

Every source yields, for the train split's human-annotated positive passages, one query per passage:
    artifacts/annotations/<source>.jsonl   {"qid": str, "pid": str, "query": str}
    artifacts/annotations/<source>.cost.json   what producing them cost (the budget model's Zdata)
Sources: human (the dataset's own pairs), ict (Inverse Cloze Task), supervised (a generator
fine-tuned on human pairs, the docT5query role), llm (zero-shot LLM, the paper's Appendix A prompt).
Which sources exist is drscaling.annotation.sources' registry; the generated ones live in
drscaling.annotation. This module owns the format, the checks (`publish`: nothing reaches
<source>.jsonl unless it passed them), human pairs and ICT.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl, write_json, write_jsonl

SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
WRAPPED = re.compile(r"(?<!\n)\n(?!\n)")  # a single newline is line wrapping, not a break


def __getattr__(name: str):
    if name == "SOURCES":  # the registered source names (drscaling.annotation.sources)
        from drscaling.annotation.sources import names

        return names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AnnotationLimits:
    min_query_chars: int = 3
    max_query_chars: int = 1000


@dataclass
class Annotations:
    """One source's output before it is written: the rows of <source>.jsonl and its cost JSON.
    `finish` runs once they are published (a generated source drops its partial run then)."""

    rows: list[dict]
    cost: dict
    finish: Callable[[], None] = field(default=lambda: None, repr=False)


def positives(prepared: str | Path) -> pd.DataFrame:
    """The train split's (qid, query, pid, passage) human pairs: the passages every source annotates."""
    return load_split(prepared, "train").pairs()


# ---------------------------------------------------------------------------------------------
# human and ICT
# ---------------------------------------------------------------------------------------------


def human_annotations(prepared: str | Path, usd_per_pair: float = 0.6) -> Annotations:
    """The dataset's own pairs, priced at a configured $ per pair (the paper's 0.6)."""
    rows = positives(prepared)[["qid", "pid", "query"]].to_dict("records")
    cost = {"source": "human", "pairs": len(rows), "usd_per_pair": usd_per_pair,
            "usd_total": usd_per_pair * len(rows), "priced_by": "configured $ per pair"}
    return Annotations(rows, cost)


def annotate_human(prepared: str | Path, out: str | Path, usd_per_pair: float = 0.6) -> dict:
    """human_annotations written to `out` without the GX checks (test fixtures; the CLI publishes)."""
    return write_annotations(out, human_annotations(prepared, usd_per_pair))


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


def ict_annotations(
    prepared: str | Path, seed: int = 0, remove_prob: float = 0.9, limits: AnnotationLimits | None = None,
) -> Annotations:
    """Deterministic given the seed. The passage a query points at stays the corpus passage (pid);
    the 'removed' variant is what the query was cut from, recorded for transparency. Free: no model."""
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


def annotate_ict(
    prepared: str | Path, out: str | Path, seed: int = 0, remove_prob: float = 0.9,
    limits: AnnotationLimits | None = None,
) -> dict:
    """ict_annotations written to `out` without the GX checks (test fixtures; the CLI publishes)."""
    return write_annotations(out, ict_annotations(prepared, seed, remove_prob, limits))


# ---------------------------------------------------------------------------------------------
# Files and checks
# ---------------------------------------------------------------------------------------------


def companion(out: str | Path, suffix: str) -> Path:
    """A file that belongs to an annotations file, beside it: ict.jsonl -> ict<suffix>."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + suffix)


def cost_path(out: str | Path) -> Path:
    return companion(out, ".cost.json")


def rejected_path(out: str | Path) -> Path:
    """Where pairs that failed the checks are kept for inspection (with their cost file beside)."""
    return companion(out, ".rejected.jsonl")


def write_annotations(out: str | Path, ann: Annotations) -> dict:
    """Cost first, then the pairs (the .jsonl appearing marks the set complete); both atomic."""
    write_json(cost_path(out), ann.cost)
    write_jsonl(out, ann.rows)
    return ann.cost


def publish(out: str | Path, ann: Annotations, prepared: str | Path, report: str | Path,
            limits: AnnotationLimits | None = None) -> dict:
    """Write `ann` to `out` and its cost file only if the pairs pass validate_annotations.

    The pairs go to a staging file beside `out`, are checked there, and are renamed onto `out`
    after the cost file is in place. When the checks fail, nothing is left at `out` or its cost
    path (an older set there is removed: the report now describes the rejected one); the pairs
    and cost move to <name>.rejected.jsonl / .rejected.cost.json and the error names them and the
    GX report. Returns the validation summary; runs ann.finish() after publishing."""
    out = Path(out)
    staged = companion(out, ".staged.jsonl")
    write_jsonl(staged, ann.rows)
    try:
        summary = validate_annotations(staged, prepared, report, limits, label=out)
    except DrscalingError as exc:
        rejected = rejected_path(out)
        os.replace(staged, rejected)
        write_json(cost_path(rejected), ann.cost)
        out.unlink(missing_ok=True)
        cost_path(out).unlink(missing_ok=True)
        raise DrscalingError(f"{exc}\nnothing was written to {out}; the rejected pairs are in {rejected} "
                             f"(cost in {cost_path(rejected).name})") from None
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    write_json(cost_path(out), ann.cost)
    os.replace(staged, out)
    rejected_path(out).unlink(missing_ok=True)
    cost_path(rejected_path(out)).unlink(missing_ok=True)
    ann.finish()
    return summary


def load_annotations(path: str | Path) -> pd.DataFrame:
    if not Path(path).exists():
        raise DrscalingError(f"annotations not found: {path} (run `drscaling annotate` for that source)")
    return pd.DataFrame(read_jsonl(path, ("qid", "pid", "query"))).astype(str)


def validate_annotations(
    path: str | Path, prepared: str | Path, report: str | Path, limits: AnnotationLimits | None = None,
    label: str | Path | None = None,
) -> dict:
    """GX suite: non-empty queries within length bounds, not equal to their passage, unique qids,
    every pid a passage of the train split. `label` names the set in the report and messages
    (default: `path`; publish passes the final name while checking a staging file)."""
    from drscaling.validate import run_suite

    limits = limits or AnnotationLimits()
    label = Path(label or path)
    ann = load_annotations(path)
    corpus = load_split(prepared, "train").corpus
    text_of = dict(zip(corpus["pid"], corpus["text"], strict=True))
    ann["pid_in_train_corpus"] = ann["pid"].isin(text_of.keys())
    ann["differs_from_passage"] = [
        q.strip().lower() != text_of.get(p, "").strip().lower() for q, p in zip(ann["query"], ann["pid"], strict=True)
    ]
    import great_expectations as gx

    E = gx.expectations
    exps = [
        E.ExpectTableRowCountToBeBetween(min_value=1),
        E.ExpectColumnValuesToBeUnique(column="qid"),
        E.ExpectColumnValuesToNotMatchRegex(column="query", regex=r"^\s*$"),
        E.ExpectColumnValueLengthsToBeBetween(column="query", min_value=limits.min_query_chars, max_value=limits.max_query_chars),
        E.ExpectColumnValuesToBeInSet(column="pid_in_train_corpus", value_set=[True]),
        E.ExpectColumnValuesToBeInSet(column="differs_from_passage", value_set=[True]),
    ]
    failures, result = run_suite(ann, f"annotations_{label.stem}", exps, str(label))
    summary = {"success": not failures, "rows": len(ann), "failures": [f.__dict__ for f in failures], "result": result}
    write_json(report, summary)
    if failures:
        lines = "\n  ".join(f.describe() for f in failures)
        raise DrscalingError(f"annotation validation failed; full GX result in {report}:\n  {lines}")
    return summary
