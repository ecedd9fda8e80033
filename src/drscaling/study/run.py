"""`drscaling study DATA`: from a user's dataset to fitted laws, a budget answer and a report.

import (split sizes that fit the data) -> validate -> tokenizer -> annotate -> plan (the preset sized
to the data) -> sweeps -> fit -> budget -> report, every stage an existing `drscaling` command run in
the study folder (see folder.py), every MLflow run in the experiment `study-<name>`. Rerunning the
same command resumes: finished training runs are reused (the sweep cache), the rest is recomputed.
With --dvc the study folder is also a DVC project: the data copy is `dvc add`ed, the stages are its
dvc.yaml, and `dvc repro` there reruns exactly what a change affects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from drscaling import params
from drscaling.design import EVAL_NEGATIVES, MIN_EVAL_PASSAGES
from drscaling.errors import DrscalingError
from drscaling.files import write_text
from drscaling.study import folder as F
from drscaling.study import pipeline as P
from drscaling.study.plan import (
    MIN_EVAL_NEGATIVES, Plan, TooSmall, eval_negatives, held_out_sizes, pairs_needed, plan_sweeps,
)
from drscaling.sweep import Preset, load_preset, merged


@dataclass
class StudyConfig:
    data: str  # a pairs JSONL file, a BEIR or MS MARCO folder, or an ir_datasets id
    format: str = "pairs"
    preset: str = "quick"
    out: Path | None = None  # default studies/<name>
    name: str | None = None  # default: from the data's file name
    sources: tuple[str, ...] = ("human",)
    dvc: bool = False
    new_data_version: bool = False
    n_bootstrap: int | None = None
    costs_path: str | None = None
    log: list[str] = field(default_factory=list)  # what was adapted, for the caller and the tests


def _say(cfg: StudyConfig, text: str) -> None:
    cfg.log.append(text)
    print(text, flush=True)


def _check_format(cfg: StudyConfig) -> None:
    """Data of another format than --format names is refused before the study folder is touched."""
    if cfg.format == "ir_datasets":
        return
    from drscaling.dataset.reading import format_hint, sniff

    found = sniff(cfg.data)
    if found is not None and found != cfg.format:
        raise DrscalingError(f"{cfg.data} is not --format {cfg.format} data{format_hint(cfg.data, cfg.format)}")
    if cfg.format in ("beir", "msmarco") and not Path(cfg.data).is_dir():
        raise DrscalingError(f"{cfg.data}: --format {cfg.format} reads a folder" + format_hint(cfg.data, cfg.format))


def _sizes(cfg: StudyConfig) -> tuple[int, int] | None:
    """Held-out sizes for a pairs file (read with the importer's own reader: format errors surface here,
    before anything is written); other formats keep the importer's choice."""
    if cfg.format != "pairs":
        return None
    from drscaling.dataset.pairs import read_pairs

    coll = read_pairs(cfg.data)
    for note in coll.notes:
        _say(cfg, f"  data: {note}")
    d = params.section("data")
    return held_out_sizes(len(coll.sources["pairs"].qrels), {"dev": d.get("dev_size", 1000),
                                                               "test": d.get("test_size", 1000)})


def _pools(prepared: Path) -> dict[str, tuple[int, int]]:
    from drscaling.data import load_split

    out = {}
    for split in ("dev", "test"):
        s = load_split(prepared, split)
        out[split] = (len(s.corpus), int(s.qrels.groupby("qid").size().max()))
    return out


def _count(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _too_small(cfg: StudyConfig, preset: Preset, exc: TooSmall, n_train: int) -> DrscalingError:
    d = params.section("data")
    train = merged(params.section("train"), preset.train)
    need = pairs_needed(preset, params.section("train"), int((train.get("eval") or {}).get("negatives", EVAL_NEGATIVES)),
                        {"dev": d.get("dev_size", 1000), "test": d.get("test_size", 1000)})
    wanted = f"about {need:,} unique pairs (one query per passage)" if need else "far more pairs"
    return DrscalingError(
        f"{cfg.data} is too small for any scaling law with preset {preset.name} (train split: {n_train:,} pairs): "
        f"{exc}. It would need {wanted}, or a preset with fewer negatives and smaller data sizes (--preset)")


def _stage(cfg: StudyConfig, run_stage: P.StageRunner, stage: P.Stage, i: int, total: int) -> None:
    _say(cfg, f"[{i}/{total}] {stage.name}: {stage.command()}")
    run_stage(stage.argv)


def _plan(cfg: StudyConfig, root: Path, preset: Preset, name: str, sources: list[str], k: int) -> Plan:
    from drscaling.data import load_split

    available = {s: _count(root / f"artifacts/annotations/{s}.jsonl") for s in sources}
    corpus = len(load_split(root / "artifacts/prepared", "train").corpus)
    try:
        plan = plan_sweeps(preset, name, params.section("train"), available, corpus, k)
    except TooSmall as exc:
        raise _too_small(cfg, preset, exc, available["human"]) from None
    # the preset's own eval settings win over params.yaml in a sweep: K goes into both
    plan.preset.train = merged(plan.preset.train, {"eval": {"negatives": k}})
    return plan


def run_study(cfg: StudyConfig, run_stage: P.StageRunner = P.run_command) -> Path:
    """Run (or resume) the study; returns the study folder. `run_stage` runs each stage's `drscaling`
    arguments (default: the command, in a subprocess; `drscaling study` runs them in its own process)."""
    if "human" not in cfg.sources:
        raise DrscalingError("--sources must include human: the sweeps train on the dataset's own pairs")
    name = F.study_name(cfg.data, cfg.name)
    root = Path(cfg.out or Path("studies") / name).absolute()
    digest = F.data_hash(cfg.format, cfg.data)
    F.check_folder(root, cfg.format, cfg.data, digest, cfg.new_data_version)
    preset = load_preset(cfg.preset)
    _check_format(cfg)
    sizes = _sizes(cfg)
    study = F.StudyFolder(root, name)
    rel = study.input_path(cfg.format, cfg.data)
    root.mkdir(parents=True, exist_ok=True)
    F.copy_input(root, cfg.format, cfg.data, rel)
    costs, costs_note = F.costs_settings(cfg.costs_path)
    record = {"name": name, "experiment": study.experiment, "data": str(Path(cfg.data).absolute())
              if cfg.format != "ir_datasets" else cfg.data, "format": cfg.format, "data_hash": None,
              "input": rel, "preset": preset.name}
    F.write_params(root, record, {"data": {"raw": rel, "prepared": "artifacts/prepared"},
                                  "sweep": {"preset": name, "train": {}}, "budget": costs,
                                  "fit": {"n_bootstrap": cfg.n_bootstrap} if cfg.n_bootstrap else {}})
    _say(cfg, f"study {name} in {root} (MLflow experiment {study.experiment}; data hash {digest})")
    if sizes:
        _say(cfg, f"  split sizes: dev {sizes[0]:,} and test {sizes[1]:,} pairs (a sixth of the data each, at most "
                  f"{MIN_EVAL_PASSAGES}): the importer's defaults would leave dev or test under the {MIN_EVAL_PASSAGES} "
                  f"passages that {EVAL_NEGATIVES} negatives need")
    data_stages = P.data_stages(cfg.format, rel, sizes, list(cfg.sources))
    with F.inside(root):
        _stage(cfg, run_stage, data_stages[0], 1, len(data_stages) + 1)
        k, k_notes = _eval_settings(cfg, root, preset)
        for i, stage in enumerate(data_stages[1:], start=2):
            _stage(cfg, run_stage, stage, i, len(data_stages) + 1)
        plan = _plan(cfg, root, preset, name, list(cfg.sources), k)
        write_text(root / "pipelines" / f"{name}.yaml", yaml.safe_dump(dataclasses.asdict(plan.preset), sort_keys=False))
        _say(cfg, f"[{len(data_stages) + 1}/{len(data_stages) + 1}] plan: pipelines/{name}.yaml, preset {preset.name} "
                  f"sized to the data; sweeps: {', '.join(plan.sweeps)}")
        for note in k_notes + plan.notes + [costs_note]:
            _say(cfg, f"  {note}")
        F.update_params(root, {"study": {"data_hash": digest}})
        laws = P.law_stages(name, plan.sweeps, list(cfg.sources), budget="joint" in plan.sweeps)
        if cfg.dvc:
            _run_dvc(cfg, root, data_stages, laws, rel)
        else:
            for i, stage in enumerate(laws, start=1):
                _stage(cfg, run_stage, stage, i, len(laws))
    _finish(cfg, root, study)
    return root


def _eval_settings(cfg: StudyConfig, root: Path, preset: Preset) -> tuple[int, list[str]]:
    """After the import: evaluation negatives from the held-out pools, into params.yaml (the validate
    gate's test-corpus minimum follows), so every later stage and the budget use the same K."""
    configured = int((merged(params.section("train"), preset.train).get("eval") or {}).get("negatives", EVAL_NEGATIVES))
    k, notes = eval_negatives(_pools(root / "artifacts/prepared"), configured)
    if k < MIN_EVAL_NEGATIVES:
        from drscaling.data import load_split

        exc = TooSmall([f"the held-out pools allow {k} evaluation negatives, fewer than {MIN_EVAL_NEGATIVES}"])
        raise _too_small(cfg, preset, exc, len(load_split(root / "artifacts/prepared", "train").qrels))
    F.update_params(root, {"train": {"eval": {"negatives": k}}, "validate": {"min_test_corpus": k + 1}})
    return k, notes


def _run_dvc(cfg: StudyConfig, root: Path, data_stages: list[P.Stage], laws: list[P.Stage], rel: str) -> None:
    """The data stages ran in-process (the plan needs them): record them, then `dvc repro` the rest."""
    P.write_dvc(root, data_stages + laws)
    P.init_dvc(root, None if cfg.format == "ir_datasets" else rel)
    P.commit(root, data_stages)
    _say(cfg, "dvc repro (sweeps, fit, budget, report) in the study folder")
    P.dvc(root, "repro", stream=True)


def _finish(cfg: StudyConfig, root: Path, study: F.StudyFolder) -> None:
    report = root / "artifacts/report/report.md"
    print(report.read_text(encoding="utf-8"), flush=True)
    _say(cfg, f"study {study.name} done: report {report}; laws {root / 'artifacts/laws/laws.json'}")
    _say(cfg, f"MLflow: experiment {study.experiment} (mlflow ui; every run of this study is there)")
    if cfg.dvc:
        _say(cfg, f"DVC: after changing {root / 'data'} or params.yaml, `dvc repro` in {root} reruns what it affects; "
                  "`drscaling study` again re-plans the sweeps for the new data")
