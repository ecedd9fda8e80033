"""The annotate stage: one source's training pairs for the train split, checked, then published
(paper section 4.3). `drscaling annotate` (dvc.yaml's annotate@<source>) parses its flags and calls
`annotate`.

Which sources exist is drscaling.annotation.sources' registry; the format of <source>.jsonl and its
cost file is drscaling.annotation.format's, the checks drscaling.annotation.checks'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drscaling import params
from drscaling.annotation import sources
from drscaling.annotation.format import companion


def annotate(source: str, prepared: str | Path, out: str | Path, report: str | Path | None = None,
             regenerate: bool = False, generation: dict[str, Any] | None = None) -> dict:
    """Annotate the train split of `prepared` with `source` (its settings: params.yaml's annotate
    section) and publish the pairs at `out` once they pass the checks; the GX report goes to `report`,
    default beside `out` as <name>.validation.json. Returns the cost dict."""
    out = Path(out)
    request = sources.Request(prepared=Path(prepared), out=out, report=Path(report or companion(out, ".validation.json")),
                              settings=params.section("annotate"), regenerate=regenerate, generation=generation or {})
    return sources.get(source).run(request)
