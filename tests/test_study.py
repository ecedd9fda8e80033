"""`drscaling study`: a user's own pairs file to laws, budget and report, under real DVC and MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import assert_strict_json, mlflow_artifact_folders

from drscaling.errors import DrscalingError
from drscaling.study import StudyConfig, run_study
from drscaling.study.folder import MEASURED_COSTS
from drscaling.study.plan import (
    MIN_EVAL_NEGATIVES, TooSmall, eval_negatives, held_out_sizes, pairs_needed, plan_sweeps,
)
from drscaling.sweep import load_preset

BIN = Path(sys.executable).parent
DEFAULTS = {"dev": 1000, "test": 1000}
# A study small enough for 2 CPU cores: from-scratch H128 shapes (the study trains their WordPiece
# vocabulary on the data), a few steps at a small learning rate (the points reach a plateau, so the
# fit's convergence check passes), 2 evaluation draws. 9 training runs.
TINY = {
    "name": "tiny",
    "train": {"steps": 6, "batch_size": 8, "negatives": 8, "max_query_len": 16, "max_passage_len": 32, "lr": 1e-5,
              "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 100, "projection": "identity",
              "eval": {"max_query_len": 16, "max_passage_len": 32, "draws": 2, "rank_pool": 100}},
    "model": {"shapes": ["bert-L2-H128", "bert-L4-H128", "bert-L6-H128", "bert-L8-H128"], "train_pairs": 50},
    "data": {"shape": "bert-L2-H128", "train_pairs": [12, 25, 50, 400]},  # 400: more than the data has
    "joint": {"shapes": ["bert-L2-H128", "bert-L4-H128"], "train_pairs": [12, 25, 50]},
}


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs_from(raw: Path, n: int, start: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()[start:start + n]]
    return [{"query": r["query"], "passage": r["passage"]} for r in rows]


def drscaling(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env |= {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "drscaling", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def dvc(*args: str, cwd: Path) -> str:
    env = os.environ | {"PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# sizing to the data (no training)
# ---------------------------------------------------------------------------------------------


def test_held_out_sizes_and_negatives_fit_small_data():
    assert held_out_sizes(20_000, DEFAULTS) is None  # the importer's defaults: 1,000 each
    assert held_out_sizes(1_015, DEFAULTS) == (169, 169)  # a sixth each: train keeps two thirds
    assert held_out_sizes(3_000, DEFAULTS) is None  # scaled: dev 300, test 600, both >= 257
    assert held_out_sizes(2_000, DEFAULTS) == (257, 257)  # scaled dev (200) is under 257
    k, notes = eval_negatives({"dev": (169, 1), "test": (170, 2)}, 256)
    assert k == 168 and "168 instead of 256" in notes[0] and "dev pool has 169" in notes[0]
    assert eval_negatives({"dev": (900, 1), "test": (900, 1)}, 256) == (256, [])


def test_plan_keeps_the_data_sizes_the_train_split_has():
    import dataclasses

    # the quick preset's shapes and training, with its D values pinned here (the shipped ones may move)
    quick = dataclasses.replace(
        load_preset("quick"),
        data={"shape": "minilm-L1", "train_pairs": [13, 25, 50, 100, 200, 400]},
        source={"shape": "minilm-L1", "sources": ["human", "ict", "supervised", "llm"], "train_pairs": [25, 50, 100, 200, 400]},
        joint={"shapes": ["minilm-L1", "minilm-L2", "minilm-L3", "minilm-L4"], "train_pairs": [25, 200, 400]})
    plan = plan_sweeps(quick, "mine", {}, {"human": 150}, train_corpus=150, negatives=100)
    assert plan.preset.name == "mine"
    assert plan.preset.data["train_pairs"] == [13, 25, 50, 100, 150]
    assert plan.preset.joint["train_pairs"] == [25, 150]
    assert plan.preset.model["train_pairs"] == 150
    assert plan.preset.source["sources"] == ["human"]  # ict/llm/supervised were not annotated
    text = "\n".join(plan.notes)
    assert "D = 200, 400 dropped (the train split has 150 pairs), D = 150 (all of them) added" in text
    assert "ict, supervised, llm left out" in text
    assert set(plan.sweeps) == {"model", "data", "source", "joint"}


def test_a_dropped_sweep_takes_its_shapes_per_shape_settings_along():
    import dataclasses

    from drscaling.sweep import points

    preset = dataclasses.replace(
        load_preset("quick"), model={"shapes": ["minilm-L1", "minilm-L5"], "train_pairs": 100},
        shape_train={"minilm-L5": {"lr": 3e-5}, "minilm-L1": {"lr": 2e-4}})
    plan = plan_sweeps(preset, "mine", {}, {"human": 150}, train_corpus=150, negatives=100)
    assert "model sweep dropped" in "\n".join(plan.notes)  # 2 shapes: too few points for L(N)
    assert plan.preset.shape_train == {"minilm-L1": {"lr": 2e-4}}  # minilm-L5 was only in the model sweep
    assert {c.lr for _, c in points(plan.preset, {}) if c.shape == "minilm-L1"} == {2e-4}


def test_too_small_for_any_law_says_how_many_pairs_it_needs():
    quick = load_preset("quick")
    with pytest.raises(TooSmall, match="too few for 16 training negatives plus a batch of 16"):
        plan_sweeps(quick, "mine", {}, {"human": 20}, train_corpus=20, negatives=100)
    need = pairs_needed(quick, {}, 256, DEFAULTS)
    assert need is not None
    sizes = held_out_sizes(need, DEFAULTS)
    assert min(sizes) - 1 >= MIN_EVAL_NEGATIVES
    # one pair fewer would not do (the bisection found the boundary)
    small = held_out_sizes(need - 1, DEFAULTS)
    train = need - 1 - sum(small)
    with pytest.raises(TooSmall):
        plan_sweeps(quick, "x", {}, {"human": train}, train, min(256, min(small) - 1))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors before any training
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_training(tmp_path, raw_pairs, capsys):
    good = write_pairs(tmp_path / "good.jsonl", pairs_from(raw_pairs, 300))
    # another format than the one named
    with pytest.raises(DrscalingError, match="is not --format beir data; it looks like JSON lines of {query, passage}"):
        run_study(StudyConfig(data=str(good), format="beir", out=tmp_path / "s1"))
    with pytest.raises(DrscalingError, match="is not --format msmarco data; it looks like JSON lines"):
        run_study(StudyConfig(data=str(good), format="msmarco", out=tmp_path / "s1"))
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    with pytest.raises(DrscalingError, match="--format msmarco reads a folder"):
        run_study(StudyConfig(data=str(tmp_path / "notes.txt"), format="msmarco", out=tmp_path / "s1"))
    assert not (tmp_path / "s1").exists()
    # an empty text, on its line
    rows = pairs_from(raw_pairs, 300)
    rows[7]["passage"] = "   "
    with pytest.raises(DrscalingError, match="line 8 has an empty or non-string 'passage'"):
        run_study(StudyConfig(data=str(write_pairs(tmp_path / "empty.jsonl", rows)), out=tmp_path / "s2"))
    assert not (tmp_path / "s2").exists()
    # duplicates are dropped and counted; what is left is too small, and the error says what would do
    dup = pairs_from(raw_pairs, 150) * 2
    with pytest.raises(DrscalingError, match=r"too small for any scaling law .* It would need about [\d,]+ unique pairs"):
        run_study(StudyConfig(data=str(write_pairs(tmp_path / "dup.jsonl", dup)), out=tmp_path / "s3"))
    assert "dropped 150 duplicate pair(s)" in capsys.readouterr().out
    assert not (tmp_path / "s3" / "artifacts" / "sweeps").exists()  # nothing trained


def test_study_folder_checks(tmp_path):
    from drscaling.study.folder import check_folder

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DrscalingError, match="is not empty and is not a study folder"):
        check_folder(tmp_path / "other", "pairs", "d.jsonl", "h1", new_version=False)
    study = tmp_path / "s"
    study.mkdir()
    (study / "params.yaml").write_text(yaml.safe_dump({"study": {"data": "/a/old.jsonl", "format": "pairs",
                                                                 "data_hash": "h0"}}))
    with pytest.raises(DrscalingError, match=r"made from other data: /a/old.jsonl \(pairs, content hash h0\).*"
                                             r"Choose another --out .* or pass --new-data-version"):
        check_folder(study, "pairs", "d.jsonl", "h1", new_version=False)
    check_folder(study, "pairs", "d.jsonl", "h0", new_version=False)  # the same data: resume
    check_folder(study, "pairs", "d.jsonl", "h1", new_version=True)  # the study's next data version


def test_wrong_format_flag_is_an_argparse_error(tmp_path):
    proc = drscaling("study", "x.jsonl", "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'csv'" in proc.stderr


# ---------------------------------------------------------------------------------------------
# a whole study, end to end, under real DVC and MLflow
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory, raw_pairs):
    root = tmp_path_factory.mktemp("study")
    data = write_pairs(root / "mydata.jsonl", pairs_from(raw_pairs, 300))
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    proc = drscaling("study", str(data), "--preset", str(root / "tiny.yaml"), "--out", str(root / "s"), "--dvc",
                     "--n-bootstrap", "20", cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, proc.stdout


def test_study_end_to_end(study):
    root, out = study
    s = root / "s"
    # sized to the data, and said so
    assert "split sizes: dev 50 and test 50 pairs" in out
    assert "evaluation negatives: 49 instead of 256" in out
    assert "data sweep: D = 400 dropped (the train split has 200 pairs), D = 200 (all of them) added" in out
    assert "costs:" in out
    plan = yaml.safe_load((s / "pipelines/mydata.yaml").read_text())
    assert plan["data"]["train_pairs"] == [12, 25, 50, 200] and plan["train"]["eval"]["negatives"] == 49
    settings = yaml.safe_load((s / "params.yaml").read_text())
    assert settings["train"]["eval"]["negatives"] == 49 and settings["study"]["experiment"] == "study-mydata"
    # laws with their checks, a budget answer, a report naming the data version
    laws = json.loads((s / "artifacts/laws/laws.json").read_text())["laws"]
    assert {"N", "D", "ND"} <= set(laws)
    assert all("flags" in law for law in laws.values())  # the checks travel with every law
    budget = json.loads((s / "artifacts/budget/budget.json").read_text())
    measured = MEASURED_COSTS.exists()  # the project's git-tracked costs, else the paper's cost model, said so
    assert budget["recommendation"] and budget["costs"]["mode"] == ("measured" if measured else "paper")
    assert ("costs: measured" if measured else "costs: the paper's cost model") in out
    report = (s / "artifacts/report/report.md").read_text()
    assert "Study **mydata**" in report and "content hash" in report and "data/input.jsonl" in report
    # every run of the study in one MLflow experiment: training runs, sweeps, fit, budget, report
    exp = mlflow.MlflowClient().get_experiment_by_name("study-mydata")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    stages = {r.data.tags.get("drscaling.stage") for r in runs}
    assert {"train", "sweep", "fit", "budget", "report"} <= stages
    assert sum(r.data.tags.get("drscaling.stage") == "train" for r in runs) == 9


def test_every_json_file_a_study_writes_is_strict_json(study):
    """Every stage's JSON / JSON-lines output (import, annotate, validate, the sweeps' runs and results,
    laws, budget, report) and every JSON artifact its MLflow runs logged parse with NaN and Infinity
    refused: what any other language's JSON parser reads."""
    root, _ = study
    checked = assert_strict_json(root / "s", *mlflow_artifact_folders("study-mydata"), at_least=30)
    assert (root / "s" / "artifacts" / "laws" / "laws.json").exists() and checked >= 30


def test_study_is_a_dvc_pipeline_that_reruns_what_data_changes_affect(study):
    s = study[0] / "s"
    assert (s / "data/input.jsonl.dvc").exists()
    pipeline = yaml.safe_load((s / "dvc.yaml").read_text())["stages"]
    assert pipeline["import"]["deps"] == ["data/input.jsonl"]
    assert all(st.get("deps") for st in pipeline.values())  # every stage depends on what it reads
    assert "Data and pipelines are up to date" in dvc("status", cwd=s)
    lines = (s / "data/input.jsonl").read_text().splitlines()
    (s / "data/input.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # a new data version
    status = dvc("status", cwd=s)
    assert "import:" in status and "modified:" in status and "data/input.jsonl" in status
    # only the stage that reads the data directly is out of date; `dvc repro` cascades from it
    assert "sweep-model:" not in status and "fit:" not in status


def test_a_study_folder_from_other_data_is_refused(study, raw_pairs, tmp_path):
    root, _ = study
    other = write_pairs(tmp_path / "other.jsonl", pairs_from(raw_pairs, 300, start=400))
    with pytest.raises(DrscalingError, match=r"was made from other data: .*mydata.jsonl.*--new-data-version"):
        run_study(StudyConfig(data=str(other), out=root / "s"))


def test_annotations_from_another_dataset_name_both_files(annotations, raw_pairs, tmp_path):
    """The embedded data's annotations against a user's dataset: an error naming both files, before training."""
    from drscaling.dataset.pairs import import_pairs
    from drscaling.train.config import Paths
    from drscaling.train.data import training_pairs

    mine = tmp_path / "prepared"
    import_pairs(write_pairs(tmp_path / "mine.jsonl", pairs_from(raw_pairs, 300)), mine, 50, 50, 13)
    paths = Paths(prepared=mine, annotations=annotations, tokenizer=tmp_path / "tok", out=tmp_path / "run")
    with pytest.raises(DrscalingError) as err:
        training_pairs(paths, "human", 0, 0)
    msg = str(err.value)
    assert str(annotations / "human.jsonl") in msg and str(mine / "train" / "corpus.jsonl") in msg
    assert "made from another dataset" in msg
