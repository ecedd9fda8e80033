"""Every MLproject entry point through `mlflow run --env-manager local`: with its defaults, with the
README's examples, and without writing any output that dvc.yaml tracks.

One module-scoped project copy (MLproject, params.yaml with tiny settings, the session's data as the
pipeline's inputs) runs the entry points in dependency waves, two at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
import yaml

from drscaling import tracking
from test_laws import write_synthetic_sweep

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = "mlproject"
TINY_TRAIN = {"steps": 2, "batch_size": 4, "negatives": 4, "max_query_len": 8, "max_passage_len": 16, "lr": 0.001,
              "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "dim": 32,
              "eval": {"negatives": 16, "draws": 1, "max_query_len": 8, "max_passage_len": 16, "batch_size": 64,
                       "rank_pool": 300}}
INPUTS = ("artifacts/prepared", "artifacts/tokenizer", "artifacts/annotations", "artifacts/sweeps/quick")


def tiny_params() -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"] |= {"dev_size": 300, "test_size": 300}
    p["tokenizer"]["vocab_size"] = 500
    p["train"] |= TINY_TRAIN
    p["sweep"] = {"preset": "quick", "train": {}}
    p["fit"] |= {"n_bootstrap": 20}
    p["budget"]["costs"] = "paper"  # measured costs are the measure entry's (under artifacts/mlproject)
    p["distill"] |= {"train_pairs": 40, "steps": 2, "batch_size": 4, "eval": TINY_TRAIN["eval"]}
    p["measure"] |= {"batch_sizes": [1], "concurrency": [1], "duration_s": 0.3}
    return p


def dvc_outs(project: Path) -> set[str]:
    """Every output path of dvc.yaml and scalingnote/dvc.yaml (foreach items and ${sweep.preset} resolved)."""
    out: set[str] = set()
    for file in (project / "dvc.yaml", project / "scalingnote" / "dvc.yaml"):
        for stage in yaml.safe_load(file.read_text())["stages"].values():
            items, body = (stage["foreach"], stage["do"]) if "foreach" in stage else ([None], stage)
            for item in items:
                for o in body.get("outs", []) + body.get("metrics", []) + body.get("plots", []):
                    path = next(iter(o)) if isinstance(o, dict) else o
                    out.add(path.replace("${item}", str(item)).replace("${sweep.preset}", "quick"))
    return out


def tree_hash(path: Path) -> str | None:
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.md5()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory, raw_pairs, prepared, annotations, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("mlproject")
    for name in ("MLproject", "conda.yaml", "dvc.yaml", "scalingnote/dvc.yaml"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    (root / "pipelines").mkdir()  # the quick preset, tiny: one shape of the model sweep
    (root / "pipelines/quick.yaml").write_text(yaml.safe_dump({"train": TINY_TRAIN, "model": {
        "shapes": ["bert-L2-H128"], "train_pairs": 40}}))
    (root / "data/debian").mkdir(parents=True)
    shutil.copy(raw_pairs, root / "data/debian/pairs.jsonl")
    # the pipeline's inputs, as `dvc repro` would have left them
    shutil.copytree(prepared, root / "artifacts/prepared")
    shutil.copytree(tokenizer_dir, root / "artifacts/tokenizer")
    shutil.copytree(annotations, root / "artifacts/annotations")
    (root / "artifacts/sweeps/quick").mkdir(parents=True)
    write_synthetic_sweep(root / "artifacts/sweeps/quick/results-all.jsonl")
    return root


def mlflow_run(project: Path, entry: str, **params: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "mlflow"), "run", str(project), "-e", entry, "--env-manager", "local",
           "--experiment-name", EXPERIMENT]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=900)


def wave(project: Path, calls: list[tuple[str, dict]]) -> dict[str, subprocess.CompletedProcess]:
    """Run entry points two at a time; each must succeed."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {label: pool.submit(mlflow_run, project, label.split("#")[0], **params) for label, params in calls}
    done = {label: f.result() for label, f in futures.items()}
    for label, proc in done.items():
        assert proc.returncode == 0, f"{label}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return done


def test_every_entry_point_runs_and_leaves_dvc_outputs_alone(project):
    entries = set(yaml.safe_load((project / "MLproject").read_text())["entry_points"])
    # created here: two `mlflow run` processes creating one experiment at once race (one fails)
    tracking.use_experiment(EXPERIMENT)
    outs = dvc_outs(project)
    before = {o: tree_hash(project / o) for o in outs}
    assert any(before.values())  # the inputs the defaults read are DVC outputs themselves

    # wave 1: every entry point that needs nothing but the pipeline's inputs, with its defaults;
    # and the README's first example
    wave(project, [("prepare", {}), ("validate", {}), ("tokenizer", {}), ("annotate", {}), ("train", {}),
                   ("train#readme", {"shape": "bert-L4-H256", "train_pairs": "800"}), ("sweep", {}), ("fit", {})])
    assert json.loads((project / "artifacts/mlproject/validation/dataset.json").read_text())["success"]
    assert (project / "artifacts/mlproject/prepared/train").exists()
    assert (project / "artifacts/mlproject/tokenizer/tokenizer.json").exists()
    assert (project / "artifacts/mlproject/annotations/human.jsonl").exists()
    assert (project / "artifacts/mlproject/laws/laws.json").exists()
    runs = {p.name.split("-D")[0]: p for p in (project / "artifacts/runs").iterdir()}
    assert set(runs) == {"bert-L2-H128", "bert-L4-H256"} and "-D800-" in runs["bert-L4-H256"].name
    (sweep_row,) = [json.loads(x) for x in (project / "artifacts/mlproject/sweeps/quick/results-model.jsonl")
                    .read_text().splitlines()]

    # wave 2: the README's evaluate example (a sweep run's model folder) and a registered model by URI,
    # the budget on the fitted laws, the export of the sweep, the distillation of the README's model
    laws = "artifacts/mlproject/laws/laws.json"
    version = mlflow.MlflowClient().search_model_versions("name = 'drscaling-bert-L4-H256'")[0].version
    done = wave(project, [
        ("evaluate", {"model": sweep_row["model_dir"]}),
        ("evaluate#registry", {"model": f"models:/drscaling-bert-L4-H256/{version}"}),
        ("budget", {"laws": laws}),
        ("export", {"sweeps": "artifacts/mlproject/sweeps"}),
        ("distill", {"teacher": runs["bert-L4-H256"], "baseline": runs["bert-L2-H128"],
                     "student_shape": "bert-L2-H128"})])
    assert '"ce"' in done["evaluate"].stdout and '"shape": "bert-L4-H256"' in done["evaluate#registry"].stdout
    assert (project / "artifacts/mlproject/budget/budget.json").exists()
    assert (project / "artifacts/mlproject/serving/repo/bert-L2-H128/config.pbtxt").exists()
    assert (project / "artifacts/mlproject/towers/distilled/metrics.json").exists()

    # wave 3: the report of both, the measured costs of the exported repository
    wave(project, [("report", {"laws": laws, "budget_json": "artifacts/mlproject/budget/budget.json"}),
                   ("measure", {"repo": "artifacts/mlproject/serving/repo"})])
    assert "Table 1" in (project / "artifacts/mlproject/report/report.md").read_text()
    assert json.loads((project / "artifacts/mlproject/costs/costs.json").read_text())["inference"]["points"]

    tested = {"prepare", "validate", "tokenizer", "annotate", "train", "sweep", "fit", "evaluate", "budget",
              "export", "distill", "report", "measure"}
    assert tested == entries, f"entry points without a test: {entries - tested}"
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list")  # with the stages' child runs
    assert {r.data.tags["mlflow.project.entryPoint"] for r in runs if "mlflow.project.entryPoint" in r.data.tags} == entries
    assert {r.info.status for r in runs} == {"FINISHED"}
    changed = [o for o in outs if tree_hash(project / o) != before[o]]
    assert not changed, f"entry points wrote DVC outputs: {changed}"


def test_entry_point_defaults_are_not_literal_quotes():
    """An empty default is "" (not the two characters '""', which reached the CLI as a path)."""
    entries = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    for name, entry in entries.items():
        for param, spec in (entry.get("parameters") or {}).items():
            assert spec.get("default") not in ('""', "''"), (name, param)
    from drscaling.cli import build_parser

    args = build_parser().parse_args(["train", "--init", "", "--steps", "", "--lr", "", "--shape", "bert-L2-H128"])
    assert args.init is None and args.steps is None and args.lr is None and args.shape == "bert-L2-H128"
