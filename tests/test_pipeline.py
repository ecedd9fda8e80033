"""The pipeline as users drive it: the CLI, real DVC commands, an MLflow project run, sweep -> fit -> budget -> report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import assert_strict_json, mlflow_artifact_folders

from drscaling.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID to child processes; a subprocess here starts clean
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    env = inherited | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = [a for a in parser._subparsers._group_actions[0].choices]
    assert {"prepare", "validate", "train", "evaluate", "sweep", "fit", "budget", "report", "annotate"} <= set(commands)
    for name in commands + ["data import", "data extract-debian"]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(name.split() + ["--help"])
        assert exit_.value.code == 0
        assert "usage: drscaling" in capsys.readouterr().out


def test_cli_reports_errors_without_traceback(tmp_path):
    proc = run([sys.executable, "-m", "drscaling", "validate", "--prepared", str(tmp_path / "none")], tmp_path, check=False)
    assert proc.returncode == 2
    assert "drscaling: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_annotate_elsewhere_keeps_its_report_beside_it(prepared, tmp_path):
    """--out away from artifacts/ must not overwrite the pipeline's GX report (a DVC output)."""
    out = tmp_path / "elsewhere" / "ict.jsonl"
    proc = run([sys.executable, "-m", "drscaling", "annotate", "--source", "ict", "--prepared", str(prepared),
                "--out", str(out)], tmp_path)
    assert "validated" in proc.stdout
    assert json.loads((tmp_path / "elsewhere" / "ict.validation.json").read_text())["success"]
    assert not (tmp_path / "artifacts").exists()


@pytest.fixture()
def dvc_repo(tmp_path, raw_pairs) -> Path:
    """A fresh git + DVC repository with the sample data tracked and pushed to a local remote."""
    repo = tmp_path / "repo"
    (repo / "data" / "debian").mkdir(parents=True)
    shutil.copy(raw_pairs, repo / "data" / "debian" / "pairs.jsonl")
    params = {"data": {"raw": "data/debian/pairs.jsonl", "prepared": "artifacts/prepared", "dev_size": 300,
                       "test_size": 300, "seed": 13}, "validate": {"min_test_corpus": 257}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    stages = {"stages": {
        "prepare": {"cmd": "drscaling prepare", "deps": ["data"], "params": ["data"], "outs": ["artifacts/prepared"]},
        "validate": {"cmd": "drscaling validate --report artifacts/validation.json", "deps": ["artifacts/prepared"],
                     "params": ["validate"], "outs": [{"artifacts/validation.json": {"cache": False}}]},
        "annotate": {"cmd": "drscaling annotate --source human", "deps": ["artifacts/validation.json"],
                     "outs": ["artifacts/annotations/human.jsonl"]},
    }}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "store")], repo)
    run(["dvc", "add", "-q", "data"], repo)
    run(["dvc", "push", "-q"], repo)
    return repo


COSTS = {"device_hour_usd": 2.0, "device": "test CPU", "measured_at": "2026-01-01T00:00:00+00:00",
         "inference": {"points": [], "fit": {"a": 1e-15, "b": 1.0}},
         "training": {"points": [], "fit": {"a": 2e-12, "b": 0.9}}}


def _add_budget_on_versioned_costs(repo: Path) -> None:
    """The project's arrangement: measured costs in git (costs/), the budget stage reading them through
    params.yaml budget.costs_path, no stage producing them."""
    (repo / "costs").mkdir()
    (repo / "costs/costs.json").write_text(json.dumps(COSTS))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    project = yaml.safe_load((REPO / "params.yaml").read_text())["budget"]
    params["budget"] = {"costs": "measured", "costs_path": project["costs_path"], "include_inference": False}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc["stages"]["budget"] = {
        "cmd": "drscaling budget --laws paper --costs measured --no-mlflow --out artifacts/budget",
        "deps": ["${budget.costs_path}"], "params": ["budget"], "outs": [{"artifacts/budget": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    with open(repo / ".gitignore", "a") as fh:  # as in the project: results stay out of git
        fh.write("/artifacts/\n")


def test_dvc_repro_is_idempotent_and_pull_restores(dvc_repo, tmp_path):
    _add_budget_on_versioned_costs(dvc_repo)
    first = run(["dvc", "repro"], dvc_repo)
    assert "Running stage 'validate'" in first.stdout and "validation passed" in first.stdout
    assert "Running stage 'budget'" in first.stdout
    assert json.loads((dvc_repo / "artifacts/budget/budget.json").read_text())["costs"]["mode"] == "measured"
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first run"], dvc_repo)
    second = run(["dvc", "repro"], dvc_repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in run(["dvc", "status"], dvc_repo).stdout
    assert run(["git", "status", "--porcelain"], dvc_repo).stdout == ""  # nothing rewritten, dvc.lock included
    # a re-measurement (new costs/costs.json in git) reruns the budget, and only the budget
    (dvc_repo / "costs/costs.json").write_text(json.dumps(COSTS | {"device_hour_usd": 3.0}))
    third = run(["dvc", "repro"], dvc_repo)
    assert "Running stage 'budget'" in third.stdout and third.stdout.count("Running stage") == 1

    run(["dvc", "push", "-q"], dvc_repo)  # stage outputs join the snapshot in the remote
    before = (dvc_repo / "data/debian/pairs.jsonl").read_bytes()
    ann = (dvc_repo / "artifacts/annotations/human.jsonl").read_bytes()
    shutil.rmtree(dvc_repo / "artifacts")
    shutil.rmtree(dvc_repo / "data")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    run(["dvc", "pull", "-q"], dvc_repo)
    assert (dvc_repo / "data/debian/pairs.jsonl").read_bytes() == before
    assert (dvc_repo / "artifacts/annotations/human.jsonl").read_bytes() == ann


def test_bad_data_stops_the_pipeline(dvc_repo):
    path = dvc_repo / "data/debian/pairs.jsonl"
    lines = path.read_text().splitlines()
    bad = json.loads(lines[5]) | {"passage": " "}  # an empty passage must not reach training
    path.write_text("\n".join(lines[:5] + [json.dumps(bad)] + lines[6:]) + "\n")
    proc = run(["dvc", "repro"], dvc_repo, check=False)
    assert proc.returncode != 0
    assert "expect_column_values_to_not_match_regex on column 'text'" in proc.stdout + proc.stderr
    assert not (dvc_repo / "artifacts/annotations/human.jsonl").exists()
    report = json.loads((dvc_repo / "artifacts/validation.json").read_text())
    assert report["success"] is False


TINY_SWEEP = {
    "name": "tiny",
    "train": {"steps": 2, "batch_size": 4, "negatives": 4, "max_query_len": 8, "max_passage_len": 16, "lr": 0.001,
              "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "dim": 32,
              "eval": {"negatives": 16, "draws": 1, "max_query_len": 8, "max_passage_len": 16, "rank_pool": 300}},
    "model": {"shapes": ["minilm-L1"], "train_pairs": 40},
}


def test_dvc_exp_queue_runs_a_sweep_variation(dvc_repo):
    """A user variation of the sweep grid through `dvc exp run --queue`: the queued experiment runs
    in DVC's temp workspace with the workspace's own preset, and the override reaches the training
    runs in MLflow."""
    (dvc_repo / "pipelines").mkdir()
    (dvc_repo / "pipelines/tiny.yaml").write_text(yaml.safe_dump(TINY_SWEEP))
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params |= {"train": {"seed": 0}, "sweep": {"preset": "tiny", "train": {}}}
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = yaml.safe_load((dvc_repo / "dvc.yaml").read_text())
    dvc["stages"]["sweep"] = {
        "cmd": "drscaling sweep --only model", "deps": ["artifacts/annotations/human.jsonl", "pipelines/tiny.yaml"],
        "params": ["train", "sweep"], "outs": [{"artifacts/sweeps/tiny/results-model.jsonl": {"cache": False}}],
        "metrics": ["artifacts/sweeps/tiny/metrics-model.json"]}
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    with open(dvc_repo / ".gitignore", "a") as fh:  # as in the project: results stay out of git
        fh.write("/artifacts/\n")
    run(["dvc", "repro", "-q"], dvc_repo)
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], dvc_repo)

    run(["dvc", "exp", "run", "--queue", "-S", "+sweep.train.lr=0.0003", "--name", "slow-lr"], dvc_repo)
    assert "slow-lr" in run(["dvc", "queue", "status"], dvc_repo).stdout
    run(["dvc", "exp", "run", "--run-all"], dvc_repo)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], dvc_repo).stdout)
    exps = [e for row in shown for e in row.get("experiments") or [] if e.get("name") == "slow-lr"]
    assert exps, shown
    rev = exps[0]["revs"][0]
    assert rev["data"]["params"]["params.yaml"]["data"]["sweep"]["train"] == {"lr": 0.0003}
    # its metrics come from the DVC cache (artifacts/ is not in git) and differ from the baseline's
    metrics = rev["data"]["metrics"]["artifacts/sweeps/tiny/metrics-model.json"]["data"]
    baseline = json.loads((dvc_repo / "artifacts/sweeps/tiny/metrics-model.json").read_text())
    assert metrics["points"] == baseline["points"] == 1
    assert metrics["ce_test_min_best"] != baseline["ce_test_min_best"]
    # the variation trained its own run; the baseline's lr stays in the workspace
    lrs = {r.data.params.get("lr") for r in mlflow.search_runs(
        experiment_names=["sweeps"], filter_string="params.shape = 'minilm-L1'", output_format="list")}
    assert {"0.001", "0.0003"} <= lrs
    run(["dvc", "exp", "apply", "slow-lr"], dvc_repo)
    assert yaml.safe_load((dvc_repo / "params.yaml").read_text())["sweep"]["train"] == {"lr": 0.0003}
    assert json.loads((dvc_repo / "artifacts/sweeps/tiny/metrics-model.json").read_text()) == metrics


def test_measured_costs_are_versioned_data_not_a_stage():
    """Triton timings are not reproducible, so no stage writes the costs the budget reads: they are git's."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "measure" not in stages
    assert "${budget.costs_path}" in stages["budget"]["deps"]
    assert yaml.safe_load((REPO / "params.yaml").read_text())["budget"]["costs_path"] == "costs/costs.json"
    outs = [o if isinstance(o, str) else next(iter(o)) for st in stages.values()
            for o in st.get("do", st).get("outs", [])]
    assert outs and not [o for o in outs if o.startswith("costs")]
    ignored = run(["git", "check-ignore", "-q", "costs/costs.json"], REPO, check=False)
    assert ignored.returncode == 1  # not ignored: versioned
    assert "drscaling measure --repo artifacts/serving/repo --out $(COSTS)" in (REPO / "Makefile").read_text()


def test_mlflow_project_entry_point(prepared, tmp_path, mlflow_store):
    proc = run([str(BIN / "mlflow"), "run", str(REPO), "-e", "validate", "-P", f"prepared={prepared}",
                "-P", f"report={tmp_path / 'report.json'}", "--env-manager", "local", "--experiment-name", "entry"], tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["success"]
    runs = mlflow.search_runs(experiment_names=["entry"], output_format="list")
    assert runs and runs[0].info.status == "FINISHED", proc.stderr[-2000:]
    assert runs[0].data.params["prepared"] == str(prepared)


def test_sweep_fit_budget_report(prepared, annotations, tokenizer_dir, tmp_path):
    preset = {
        "name": "tiny",
        "train": {"steps": 8, "batch_size": 8, "negatives": 16, "max_query_len": 16, "max_passage_len": 24,
                  "lr": 0.001, "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8, "dim": 32,
                  "eval": {"negatives": 64, "draws": 2, "max_query_len": 16, "max_passage_len": 24, "rank_pool": 400}},
        "model": {"shapes": ["bert-L2-H128", "bert-L4-H128", "bert-L6-H128", "bert-L2-H256"], "train_pairs": 200},
        "data": {"shape": "bert-L2-H128", "train_pairs": [50, 100, 200, 400]},
        "source": {"shape": "bert-L2-H128", "sources": ["human", "ict"], "train_pairs": [50, 100, 200, 400]},
        "joint": {"shapes": ["bert-L2-H128", "bert-L4-H128"], "train_pairs": [100, 200, 400]},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(preset))
    common = ["--prepared", str(prepared), "--annotations", str(annotations), "--tokenizer", str(tokenizer_dir)]
    drs = [sys.executable, "-m", "drscaling"]
    for sweep in ("model", "data", "source", "joint"):
        run(drs + ["sweep", "--preset", str(tmp_path / "tiny.yaml"), "--only", sweep] + common, tmp_path)
    results = tmp_path / "artifacts/sweeps/tiny"
    rows = [json.loads(x) for f in results.glob("results-*.jsonl") for x in f.read_text().splitlines()]
    assert len(rows) == 4 + 4 + 8 + 6
    assert len({r["config_key"] for r in rows}) == len(list((results / "runs").iterdir()))  # shared points trained once

    # an interrupted sweep picks up where it stopped: rerunning trains nothing new
    stamps = {p: p.stat().st_mtime for p in results.glob("runs/*/metrics.json")}
    run(drs + ["sweep", "--preset", str(tmp_path / "tiny.yaml"), "--only", "joint"] + common, tmp_path)
    assert {p: p.stat().st_mtime for p in results.glob("runs/*/metrics.json")} == stamps

    fit = run(drs + ["fit", "--preset", "tiny", "--n-bootstrap", "30"], tmp_path)
    assert "L(N)" in fit.stdout and "L(N,D)" in fit.stdout
    laws = json.loads((tmp_path / "artifacts/laws/laws.json").read_text())
    assert {"N", "D", "ND", "D@human", "D@ict"} <= set(laws["laws"])
    assert list((tmp_path / "artifacts/laws/figures").glob("*.png"))

    budget = run(drs + ["budget", "--budget", "20000", "--include-inference", "--costs", "paper"], tmp_path)
    assert "Recommended" in budget.stdout and "3.22e-08" in budget.stdout
    run(drs + ["report", "--out", str(tmp_path / "report.md")], tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Table 1" in text and "α" in text and "Budget allocation" in text
    # what `make run` ends with: every law with its points, degrees of freedom, held-out check, flags
    summary = run(drs + ["summary"], tmp_path).stdout
    assert "dof = " in summary and "held-out" in summary and "zero-shot" in summary and "Recommended" in summary

    # this test's own parent runs, by their ids: the store is shared by every test of this worker
    for sweep in ("model", "data", "source", "joint"):
        parent = mlflow.get_run(json.loads((results / f"parent-tiny-{sweep}.json").read_text())["run_id"])
        assert parent.data.tags["drscaling.stage"] == "sweep" and parent.data.tags["sweep"] == sweep
        children = mlflow.search_runs(experiment_names=["sweeps"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list")
        assert children, sweep
    # strict JSON (no NaN / Infinity) in every file the stages wrote and every JSON artifact their runs logged
    assert_strict_json(tmp_path / "artifacts", *mlflow_artifact_folders(), at_least=50)


def test_sweep_overrides_beat_the_preset_and_the_workspace_preset_wins(tmp_path, monkeypatch):
    from drscaling.errors import DrscalingError
    from drscaling.sweep import load_preset, points

    quick = load_preset("quick")
    base = {"lr": 0.001, "seed": 3, "eval": {"draws": 10}}
    cfgs = [c for _, c in points(quick, base, {"lr": 0.0003, "eval": {"draws": 2}})]
    assert {c.lr for c in cfgs} == {0.0003}  # params.yaml sweep.train > preset > params.yaml train
    assert {c.seed for c in cfgs} == {3}  # not in the preset: params.yaml train
    assert {(c.eval.draws, c.eval.rank_pool) for c in cfgs} == {(2, 2000)}  # eval merged, not replaced
    lrs = {c.shape: c.lr for _, c in points(quick, base)}  # the preset's train, or its shape_train entry
    assert lrs == {s: quick.shape_train.get(s, {}).get("lr", quick.train["lr"]) for s in lrs}
    assert len(set(lrs.values())) == 2

    # a `dvc exp` workspace's own pipelines/ is read before the installed project's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines/quick.yaml").write_text(yaml.safe_dump(TINY_SWEEP | {"name": "quick"}))
    assert load_preset("quick").model == TINY_SWEEP["model"]
    with pytest.raises(DrscalingError, match="unknown preset 'nope'.*quick"):
        load_preset("nope")


def test_shape_train_sets_one_shape_s_points_and_bad_entries_are_named():
    from drscaling.errors import DrscalingError
    from drscaling.sweep import Preset, points

    preset = Preset("p", train={"lr": 1e-4, "steps": 10}, model={"shapes": ["bert-L2-H128", "bert-L4-H128"]},
                    data={"shape": "bert-L4-H128", "train_pairs": [5, 10]}, shape_train={"bert-L4-H128": {"lr": 3e-5}})
    got = sorted((sweep, c.shape, c.train_pairs, c.lr, c.steps) for sweep, c in points(preset, {}))
    assert got == [("data", "bert-L4-H128", 5, 3e-5, 10), ("data", "bert-L4-H128", 10, 3e-5, 10),
                   ("model", "bert-L2-H128", 0, 1e-4, 10), ("model", "bert-L4-H128", 0, 3e-5, 10)]
    assert {c.lr for _, c in points(preset, {}, {"lr": 1e-3})} == {1e-3}  # params.yaml sweep.train still wins
    for bad, message in [({"bert-L8-H128": {"lr": 1}}, "shape_train names bert-L8-H128, which no sweep of it trains"),
                         ({"bert-L2-H128": 3e-5}, "shape_train.bert-L2-H128 must map training parameters"),
                         ({"bert-L2-H128": {"train_pairs": 3}}, "other than shape, train_pairs"),
                         ({"bert-L2-H128": {"lrr": 3}}, "unknown TrainConfig parameter.*lrr")]:
        with pytest.raises(DrscalingError, match=message):
            points(Preset("p", model={"shapes": ["bert-L2-H128"]}, shape_train=bad), {})


def test_make_exps_is_a_compact_dvc_exp_show(tmp_path):
    """`make exps` (`dvc exp show --drop '.*' --keep EXP_COLUMNS`) on a repo with the fit stage's metrics
    file and the project's params: the experiment, the fitted exponents and R^2, the varied parameters."""
    import re

    from test_laws import write_synthetic_sweep

    from drscaling.laws.stage import fit_sweep

    keep = re.search(r"^EXP_COLUMNS := (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).replace("$$", "$")
    repo = tmp_path / "repo"
    fit_sweep(write_synthetic_sweep(tmp_path / "results.jsonl"), repo / "artifacts/laws", n_bootstrap=5, seed=0)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fit": {
        "cmd": "true", "params": ["sweep", "train"], "metrics": [{"artifacts/laws/metrics.json": {"cache": False}}]}}}))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], repo)
    everything = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout.splitlines()[0].split(",")
    shown = run(["dvc", "exp", "show", "--no-pager", "--csv", "--drop", ".*", "--keep", keep], repo).stdout
    columns = shown.splitlines()[0].split(",")
    assert {"Experiment", "N.alpha", "D.beta", "ND.alpha", "ND.beta", "N.r2", "sweep.preset", "train.seed"} <= set(columns)
    assert len(columns) <= 20 < len(everything), columns
