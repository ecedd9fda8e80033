"""The study folder: one place every stage of a study reads its dataset, settings and preset from.

    <study>/params.yaml            the project's params.yaml with the study's settings (`study:` section:
                                   name, MLflow experiment, data, format, content hash)
    <study>/data/input[.jsonl]     a copy of the user's data (DVC-tracked with --dvc)
    <study>/pipelines/<name>.yaml  the preset sized to the data
    <study>/artifacts/...          prepared splits, annotations, sweeps, laws, budget, report
    <study>/dvc.yaml               with --dvc: the same stages as a DVC pipeline

Stages run with the study folder as working directory, so the `drscaling` commands' default paths
(artifacts/..., params.yaml, pipelines/) all resolve inside it: a stage can never read one dataset's
annotations with another dataset's corpus. The data's content hash is recorded, and a different
dataset given for an existing study folder is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from drscaling import params, tracking
from drscaling.errors import DrscalingError
from drscaling.files import write_text

PARAMS = "params.yaml"
# Measured costs the project keeps under git; without them the budget prices with the paper's cost model.
MEASURED_COSTS = params.REPO / "costs" / "costs.json"


@dataclass
class StudyFolder:
    root: Path
    name: str

    @property
    def experiment(self) -> str:
        return f"study-{self.name}"

    def input_path(self, fmt: str, src: str) -> str:
        """Where the copy of the data lives, relative to the root (an ir_datasets id is not copied)."""
        if fmt == "ir_datasets":
            return src
        return "data/input.jsonl" if fmt == "pairs" else "data/input"


def study_name(data: str, name: str | None) -> str:
    raw = name or Path(data.rstrip("/")).name.split(".")[0] or "study"
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-").lower()
    if not slug:
        raise DrscalingError(f"cannot make a study name from {raw!r}; pass --name")
    return slug


def data_hash(fmt: str, src: str) -> str:
    """Content hash of the user's data (a file or a folder); an ir_datasets id hashes as its id."""
    if fmt == "ir_datasets":
        return "ir_datasets:" + src
    path = Path(src)
    if not path.exists():
        raise DrscalingError(f"{src}: not found (DATA is a pairs JSONL file, a BEIR or MS MARCO folder, "
                             "or an ir_datasets id with --format ir_datasets)")
    return tracking.file_version(path)


def recorded(root: Path) -> dict:
    """The study section of an existing study folder's params.yaml ({} for a new folder)."""
    return params.section("study", root / PARAMS) if (root / PARAMS).exists() else {}


def check_folder(root: Path, fmt: str, src: str, digest: str, new_version: bool) -> None:
    """Refuse a folder that is not a study, or a study of other data (unless `new_version`)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DrscalingError(f"--out {root} is a file; choose a folder for the study")
    before = recorded(root)
    if not before:
        if any(root.iterdir()):
            raise DrscalingError(f"--out {root} is not empty and is not a study folder (no {PARAMS} with a "
                                 "`study:` section); choose a new folder")
        return
    if before.get("data_hash") == digest or new_version:
        return
    raise DrscalingError(
        f"study folder {root} was made from other data: {before.get('data')} ({before.get('format')}, content hash "
        f"{before.get('data_hash')}); {src} ({fmt}) has hash {digest}. Choose another --out for a second study "
        "side by side, or pass --new-data-version to make this data the study's next version (its results are "
        "recomputed; DVC keeps the old version)")


def copy_input(root: Path, fmt: str, src: str, rel: str) -> None:
    """Copy the data into the study (replacing an older version there)."""
    if fmt == "ir_datasets":
        return
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        shutil.rmtree(dest)
    if Path(src).is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copyfile(src, dest)


def write_params(root: Path, study: dict, overrides: dict) -> None:
    """The project's params.yaml with the study's values over it: `overrides` merged section by section."""
    from drscaling.sweep import merged

    base = params.load(params.REPO / PARAMS)
    values = merged(base, overrides, {"study": study})
    header = ("# A drscaling study: the project's params.yaml with values sized to this study's data.\n"
              "# Written by `drscaling study`; every stage run in this folder reads it.\n")
    write_text(root / PARAMS, header + yaml.safe_dump(values, sort_keys=False))


def update_params(root: Path, overrides: dict) -> None:
    from drscaling.sweep import merged

    values = merged(params.load(root / PARAMS), overrides)
    text = (root / PARAMS).read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    write_text(root / PARAMS, header + yaml.safe_dump(values, sort_keys=False))


def costs_settings(costs_path: str | None) -> tuple[dict, str]:
    """The budget section's cost settings and a sentence saying which costs the budget uses."""
    path = Path(costs_path) if costs_path else MEASURED_COSTS
    if path.exists():
        return ({"costs": "measured", "costs_path": str(path.resolve())},
                f"costs: measured ({path}), reused: no serving measurement is made for the study")
    why = f"{path} not found" + ("" if costs_path else " (the project's measured costs are not in this checkout)")
    return {"costs": "paper"}, f"costs: the paper's cost model (eq. 12-14), as {why}; pass --costs-path to use yours"


@contextlib.contextmanager
def inside(root: Path) -> Iterator[None]:
    """Run with the study folder as working directory (the stages' relative paths resolve there)."""
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def data_lines(study: dict) -> list[str]:
    """The report's statement of which data its numbers came from: the study's input, with the content
    hash of the copy the stages read (computed now, so it is right after a `dvc repro` on new data)."""
    if not study:
        return []
    rel = study.get("input")
    path = Path(rel) if rel else None
    version = (tracking.file_version(path) if path is not None and path.exists()
               else study.get("data_hash") or "unknown")
    return [f"Study **{study.get('name')}**: every number below comes from `{rel}` (format {study.get('format')}, "
            f"content hash `{version}`; copied from `{study.get('data')}`), preset {study.get('preset')} sized to "
            f"it (`pipelines/{study.get('name')}.yaml`), MLflow experiment `{study.get('experiment')}`.", ""]
