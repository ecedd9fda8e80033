"""The Great Expectations gate: data that fails a suite stops the pipeline before anything trains on it.

A suite is a list of GX expectations run on one pandas DataFrame (one file). The gate writes the full
GX results as JSON (atomically) and, on failure, raises an error naming the failed expectation, the
file, the number of offending rows and a few of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from drscaling.data import FILES, SPLITS
from drscaling.design import MIN_EVAL_PASSAGES
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl, write_json

BLANK = r"^\s*$"


@dataclass
class Bounds:
    """Length bounds (characters) and minimum row counts the dataset must meet."""

    min_query_chars: int = 2
    max_query_chars: int = 1000
    min_passage_chars: int = 10
    max_passage_chars: int = 100000
    min_test_corpus: int = MIN_EVAL_PASSAGES  # a positive and the evaluation's negatives
    min_rows: dict[str, int] = field(default_factory=lambda: {"train": 1, "dev": 1, "test": 1})


@dataclass
class Failure:
    file: str
    expectation: str
    column: str | None
    unexpected_count: int
    examples: list[Any]

    def describe(self) -> str:
        col = f" on column '{self.column}'" if self.column else ""
        ex = f"; e.g. {self.examples[:5]}" if self.examples else ""
        return f"{self.file}: {self.expectation}{col} failed for {self.unexpected_count} row(s){ex}"


def _context():
    # GX is slow to import (~4 s) and chatty: import lazily and keep its progress bars off.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    except Exception:  # noqa: BLE001 - progress-bar config moved between GX versions; cosmetic only
        pass
    return gx, ctx


def run_suite(df: pd.DataFrame, name: str, expectations: list, label: str) -> tuple[list[Failure], dict]:
    """Run `expectations` on `df`; returns the failures and the JSON-able GX result."""
    gx, ctx = _context()
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for exp in expectations:
        suite.add_expectation(exp)
    batch = (
        ctx.data_sources.add_pandas(f"src_{name}")
        .add_dataframe_asset(f"asset_{name}")
        .add_batch_definition_whole_dataframe(f"batch_{name}")
    )
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"vd_{name}", data=batch, suite=suite))
    ids = [c for c in ("qid", "pid") if c in df.columns]
    fmt = {"result_format": "SUMMARY", "unexpected_index_column_names": ids} if ids else "SUMMARY"
    result = vd.run(batch_parameters={"dataframe": df}, result_format=fmt)
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        res = r.result or {}
        count = res.get("unexpected_count")
        if count is None:  # table-level expectations report an observed value instead
            count = 1
        failures.append(Failure(
            file=label, expectation=cfg.type, column=cfg.kwargs.get("column"),
            unexpected_count=int(count),
            examples=_examples(res),
        ))
    return failures, stable(result.to_json_dict())


# Per-run values in a GX result (timestamps, random ids): dropped, so the report is a pure function of
# the data and the DVC stages downstream of it do not rerun when nothing changed.
VOLATILE_KEYS = frozenset({"id", "validation_id", "run_time", "validation_time", "ge_load_time", "run_id", "batch_id"})


def stable(obj: Any) -> Any:
    """`obj` without VOLATILE_KEYS, at any depth."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def _examples(res: dict) -> list[Any]:
    """A few offending rows, by id where GX gives them, with long texts cut short."""
    rows = res.get("partial_unexpected_index_list") or res.get("partial_unexpected_list")
    if not rows:
        return [res.get("observed_value")]
    cut = lambda v: v[:80] + "..." if isinstance(v, str) and len(v) > 80 else v  # noqa: E731
    return [{k: cut(v) for k, v in r.items()} if isinstance(r, dict) else cut(r) for r in rows[:5]]


def _text_expectations(gx, id_col: str, min_chars: int, max_chars: int) -> list:
    E = gx.expectations
    return [
        E.ExpectTableColumnsToMatchSet(column_set=[id_col, "text"], exact_match=False),
        E.ExpectColumnValuesToNotBeNull(column=id_col),
        E.ExpectColumnValuesToBeUnique(column=id_col),
        E.ExpectColumnValuesToNotBeNull(column="text"),
        E.ExpectColumnValuesToNotMatchRegex(column="text", regex=BLANK),
        E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=min_chars, max_value=max_chars),
    ]


def _load(path: Path) -> pd.DataFrame:
    df = pd.DataFrame(read_jsonl(path))
    return df.astype({c: str for c in df.columns if c in ("qid", "pid")})


def validate_dataset(root: str | Path, report: str | Path, bounds: Bounds | None = None) -> dict:
    """Run the corpus/queries/qrels suites of every split and the cross-split checks."""
    bounds = bounds or Bounds()
    gx, _ = _context()
    E = gx.expectations
    root = Path(root)
    frames = {
        (split, name): _load(root / split / f"{name}.jsonl") for split in SPLITS for name in FILES
    }
    failures: list[Failure] = []
    results: dict[str, Any] = {}
    for split in SPLITS:
        corpus, queries, qrels = (frames[(split, n)] for n in FILES)
        min_rows = bounds.min_test_corpus if split == "test" else bounds.min_rows.get(split, 1)
        suites = {
            "corpus": _text_expectations(gx, "pid", bounds.min_passage_chars, bounds.max_passage_chars)
            + [E.ExpectTableRowCountToBeBetween(min_value=min_rows)],
            "queries": _text_expectations(gx, "qid", bounds.min_query_chars, bounds.max_query_chars)
            + [E.ExpectTableRowCountToBeBetween(min_value=bounds.min_rows.get(split, 1))],
            "qrels": [
                E.ExpectTableColumnsToMatchSet(column_set=["qid", "pid"], exact_match=False),
                E.ExpectColumnValuesToNotBeNull(column="qid"),
                E.ExpectColumnValuesToNotBeNull(column="pid"),
                E.ExpectCompoundColumnsToBeUnique(column_list=["qid", "pid"]),
                E.ExpectTableRowCountToBeBetween(min_value=bounds.min_rows.get(split, 1)),
            ],
        }
        # Referential integrity and leakage as boolean columns: GX's in-set check on a large value
        # set costs ~10 s per call, pandas' isin milliseconds; GX still asserts and reports them.
        frames[(split, "qrels")] = qrels = qrels.copy()
        checks = {"qid_in_queries": ("qid", queries, "qid"), "pid_in_corpus": ("pid", corpus, "pid")}
        if split != "train":
            train_qrels = frames[("train", "qrels")]
            checks |= {"qid_not_in_train": ("qid", train_qrels, "qid"), "pid_not_in_train": ("pid", train_qrels, "pid")}
        for flag, (col, other, other_col) in checks.items():
            if col in qrels and other_col in other:  # a missing column is already reported above
                known = qrels[col].isin(set(other[other_col]))
                qrels[flag] = ~known if flag.endswith("not_in_train") else known
                suites["qrels"].append(E.ExpectColumnValuesToBeInSet(column=flag, value_set=[True]))
        for name, exps in suites.items():
            label = str(root / split / f"{name}.jsonl")
            f, res = run_suite(frames[(split, name)], f"{split}_{name}", exps, label)
            failures += f
            results[f"{split}/{name}"] = res
    summary = {
        "success": not failures,
        "rows": {f"{s}/{n}": len(df) for (s, n), df in frames.items()},
        "failures": [f.__dict__ for f in failures],
        "results": results,
    }
    write_json(report, summary)
    if failures:
        lines = "\n  ".join(f.describe() for f in failures)
        raise DrscalingError(f"data validation failed ({len(failures)} expectation(s)); full GX result in {report}:\n  {lines}")
    return summary
