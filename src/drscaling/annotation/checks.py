"""The checks every annotation set passes before it is published: nothing reaches <source>.jsonl
unless it passed them (a Great Expectations suite; the report is written either way)."""

from __future__ import annotations

import os
from pathlib import Path

from drscaling.annotation.bounds import AnnotationLimits
from drscaling.annotation.format import Annotations, companion, cost_path, load_annotations, rejected_path
from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.files import write_json, write_jsonl


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
