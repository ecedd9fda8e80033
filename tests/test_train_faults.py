"""Training under faults: SIGTERM and SIGKILL of a real `drscaling train` and `drscaling sweep`, a truncated checkpoint,
a data change between kill and resume, two processes on one output folder. Nothing lost, mixed or
left RUNNING in MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import pytest
import yaml

import drscaling.train.step as T
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig
from drscaling.files import folder_lock, read_json, read_jsonl
from drscaling.sweep import load_preset, run_sweep
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.data import data_key, run_data_key
from drscaling.train.resume import read_checkpoint
from drscaling.train.run import train

EVAL = EvalConfig(negatives=32, draws=2, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=0)
FLAGS = ["--shape", "bert-L2-H128", "--steps", "30", "--batch-size", "8", "--warmup-steps", "5", "--negatives", "16",
         "--max-query-len", "16", "--max-passage-len", "32", "--lr", "0.001", "--eval-every", "10",
         "--checkpoint-every", "1000", "--dim", "64", "--eval-negatives", "32", "--eval-draws", "2",
         "--eval-max-query-len", "16", "--eval-max-passage-len", "32", "--eval-rank-pool", "0", "--eval-batch-size", "64"]


def cfg(**kw) -> TrainConfig:
    base = dict(shape="bert-L2-H128", steps=30, batch_size=8, negatives=16, max_query_len=16, max_passage_len=32,
                lr=1e-3, warmup_steps=5, eval_every=10, checkpoint_every=1000, dim=64, eval=EVAL)
    return TrainConfig(**(base | kw))


def cli(prepared, annotations, tokenizer_dir, out: Path, experiment: str) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "drscaling", "train", "--prepared", str(prepared), "--annotations", str(annotations),
           "--tokenizer", str(tokenizer_dir), "--out", str(out), *FLAGS]
    return cmd, os.environ | {"PYTHONUNBUFFERED": "1", "DRSCALING_EXPERIMENT": experiment}


def runs_of(experiment: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def crash_after_checkpoint(monkeypatch, steps: int) -> None:
    """Make the next run die (as a crash would) once `steps` steps have run."""
    real, calls = T.contrastive_loss, {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] > steps:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(T, "contrastive_loss", loss)


@pytest.fixture(scope="module")
def reference(prepared, annotations, tokenizer_dir, tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must match."""
    out = tmp_path_factory.mktemp("reference")
    return train(cfg(), Paths(prepared, annotations, tokenizer_dir, out))


def test_sigterm_checkpoints_ends_killed_and_resumes_identically(prepared, annotations, tokenizer_dir, tmp_path, reference):
    out = tmp_path / "run"
    cmd, env = cli(prepared, annotations, tokenizer_dir, out, "faults-sigterm")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(out / "run.json", proc)
    time.sleep(2.0)  # past the zero-shot evaluation, into the steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM at step" in err and "Traceback" not in err
    assert (out / "checkpoint" / "checkpoint.pt").exists() and not (out / "metrics.json").exists()
    [run] = runs_of("faults-sigterm")
    assert run.info.status == "KILLED" and "Terminated" in run.data.tags["error"]

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    done = json.loads((out / "metrics.json").read_text())
    for key in ("ce_test_min", "ce_dev_best", "ce_test_at_best_dev", "ce_test_zero_shot"):
        assert done[key] == pytest.approx(reference[key], abs=1e-6), key
    [run] = runs_of("faults-sigterm")  # the same run, resumed: one FINISHED run, none RUNNING
    assert run.info.status == "FINISHED" and run.info.run_id == done["run_id"]
    assert "error" not in run.data.tags and "Terminated" in run.data.tags["resumed_after"]


def test_sigkill_before_the_first_checkpoint_leaves_no_running_run(prepared, annotations, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    cmd, env = cli(prepared, annotations, tokenizer_dir, out, "faults-sigkill")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(out / "run.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint").exists()
    [stuck] = runs_of("faults-sigkill")
    assert stuck.info.status == "RUNNING"  # what SIGKILL leaves; the rerun must take it over

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    [run] = runs_of("faults-sigkill")
    assert run.info.run_id == stuck.info.run_id and run.info.status == "FINISHED"
    # the adopted run carries what a sweep finds it by, even if the kill came before the first process set it
    done = json.loads((out / "metrics.json").read_text())
    assert run.data.tags["config_key"] == done["config_key"] and run.data.tags["data_key"] == done["data_key"]
    assert run.data.params["config_key"] == done["config_key"]


def write_phase(tmp: Path, out: Path) -> str:
    """Where a process frozen with its temporary checkpoint folder `tmp` still present was in the write."""
    file = tmp / "checkpoint" / "checkpoint.pt"
    if not file.exists():
        return "temporary folder made, checkpoint file not yet opened"
    if not zipfile.is_zipfile(file):  # torch.save writes a zip: its directory comes last
        return f"inside torch.save ({file.stat().st_size} bytes written)"
    if not (out / "checkpoint").exists():
        return "checkpoint written, the previous one removed, not yet renamed into place"
    return "checkpoint written, not yet renamed into place"


def freeze_in_a_checkpoint_write(proc: subprocess.Popen, out: Path, skip: int = 1,
                                 inside_tries: int = 20) -> tuple[str | None, int]:
    """Freeze (SIGSTOP) a training that checkpoints every step while it writes a checkpoint, preferably
    inside torch.save. The first `skip` writes are let through (so a good checkpoint is there before);
    then: watch for the write's temporary folder, freeze, and step the process on a millisecond at a
    time until the file is part-written; a write that completes between two looks is let go and the
    next one tried. After `inside_tries` writes, any moment before the rename will do.
    Returns (where it froze, writes tried); (None, tries) if the training ended first."""
    tries, seen, deadline = 0, set(), time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        tmp = next(out.glob(".checkpoint.*.tmp"), None) if out.exists() else None
        if tmp is None or (len(seen | {tmp}) <= skip):
            seen |= {tmp} - {None}
            time.sleep(0.0002)
            continue
        os.killpg(proc.pid, signal.SIGSTOP)
        tries += 1
        phase = write_phase(tmp, out) if tmp.exists() else None
        while phase is not None and tries <= inside_tries and not phase.startswith("inside"):
            os.killpg(proc.pid, signal.SIGCONT)
            time.sleep(0.001)
            os.killpg(proc.pid, signal.SIGSTOP)
            phase = write_phase(tmp, out) if tmp.exists() else None
        if phase is not None:
            return phase, tries
        os.killpg(proc.pid, signal.SIGCONT)  # renamed into place before a look: the next checkpoint
    return None, tries


def test_sigkill_during_a_checkpoint_write_resumes_to_identical_metrics(prepared, annotations, tokenizer_dir, tmp_path,
                                                                       reference, record_property):
    """SIGKILL a real `drscaling train` while it writes a checkpoint (frozen there first, preferably inside
    torch.save; the phase it hit is printed and recorded as the test's `kill_phase` property), after one
    checkpoint was written whole. The rerun resumes from that one (or starts afresh if the kill came
    between removing it and renaming the new one into place) to the metrics of an uninterrupted run, in
    the same MLflow run, FINISHED, with the half-written folder removed."""
    out = tmp_path / "run"
    cmd, env = cli(prepared, annotations, tokenizer_dir, out, "faults-checkpoint-write")
    cmd[cmd.index("--checkpoint-every") + 1] = "1"  # a checkpoint after every step: 30 writes to catch one in
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        phase, tries = freeze_in_a_checkpoint_write(proc, out)
        if phase is not None:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    record_property("kill_phase", f"{phase} (after {tries} tries)")
    print(f"killed during a checkpoint write: {phase} (after {tries} tries)")
    assert phase is not None, f"no checkpoint write caught in {tries} tries"
    [stale] = out.glob(".checkpoint.*.tmp")  # what the kill left
    previous = read_checkpoint(out / "checkpoint", cfg(checkpoint_every=1))  # the last good one, whole
    assert previous is not None or "previous one removed" in phase
    assert previous is None or 1 <= previous["state"]["step"] < 30
    [stuck] = runs_of("faults-checkpoint-write")
    assert stuck.info.status == "RUNNING"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["resumed"] == (previous is not None)
    done = json.loads((out / "metrics.json").read_text())
    for key in ("ce_test_min", "ce_dev_best", "ce_test_at_best_dev", "ce_test_zero_shot"):
        assert done[key] == pytest.approx(reference[key], abs=1e-6), key
    [run] = runs_of("faults-checkpoint-write")
    assert run.info.run_id == stuck.info.run_id == done["run_id"] and run.info.status == "FINISHED"
    assert not stale.exists() and not list(out.glob(".*.tmp")) and not (out / "checkpoint").exists()


SWEEP_TRAIN = {"steps": 30, "batch_size": 8, "warmup_steps": 5, "negatives": 16, "max_query_len": 16,
               "max_passage_len": 32, "lr": 0.001, "eval_every": 10, "checkpoint_every": 1000, "dim": 64,
               "eval": {"negatives": 32, "draws": 2, "max_query_len": 16, "max_passage_len": 32, "batch_size": 64,
                        "rank_pool": 0}}


def sweep_cli(prepared, annotations, tokenizer_dir, preset: Path, out: Path, pairs: list[int],
              experiment: str = "faults-sweep", train: dict = SWEEP_TRAIN) -> tuple[list[str], dict]:
    """`drscaling sweep` over a data sweep of bert-L2-H128 at `pairs` (the preset file is rewritten)."""
    preset.write_text(yaml.safe_dump({"name": "faultsweep", "train": train,
                                      "data": {"shape": "bert-L2-H128", "train_pairs": pairs}}))
    cmd = [sys.executable, "-m", "drscaling", "sweep", "--preset", str(preset), "--only", "data", "--out", str(out),
           "--prepared", str(prepared), "--annotations", str(annotations), "--tokenizer", str(tokenizer_dir)]
    return cmd, os.environ | {"PYTHONUNBUFFERED": "1", "DRSCALING_EXPERIMENT": experiment}


def children(out: Path, experiment: str = "faults-sweep") -> list:
    parent = read_json(out / "parent-faultsweep-data.json")["run_id"]
    return mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'")


@pytest.fixture(scope="module")
def sweep_reference(prepared, annotations, tokenizer_dir, tmp_path_factory) -> list[dict]:
    """The rows of an uninterrupted data sweep at 40 and 60 pairs, what every interrupted one must match."""
    root = tmp_path_factory.mktemp("sweep-reference")
    sweep_cli(prepared, annotations, tokenizer_dir, root / "faultsweep.yaml", root, [40, 60])  # writes the preset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRSCALING_EXPERIMENT", "faults-sweep-reference")
        path = run_sweep(load_preset(str(root / "faultsweep.yaml")),
                         Paths(prepared, annotations, tokenizer_dir, Path("unused")), {}, root / "sweep", "data")
    return read_jsonl(path)


def assert_same_results(rows: list[dict], reference: list[dict]) -> None:
    for row, ref in zip(rows, reference, strict=True):
        for key in ("ce_test_min", "ce_dev_best", "ce_test_at_best_dev", "ce_test_zero_shot"):
            assert row[key] == pytest.approx(ref[key], abs=1e-6), key


def kill_during_second_point(proc: subprocess.Popen, out: Path, sig: int) -> None:
    """Send `sig` to the sweep once its first point is finished and its second has started its run."""
    deadline, mid_second = time.time() + 3600, False  # seconds on an idle machine; a loaded one is slower
    while not mid_second and time.time() < deadline and proc.poll() is None:
        done = {p.parent for p in out.glob("runs/*/metrics.json")}
        mid_second = bool(done) and any(p.parent not in done for p in out.glob("runs/*/run.json"))
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    assert mid_second, "the sweep was not stopped during its second point"


def test_sigkilled_sweep_reruns_to_one_finished_child_per_point(prepared, annotations, tokenizer_dir, tmp_path,
                                                                 sweep_reference):
    """SIGKILL a real `drscaling sweep` while its second point trains: a rerun of a preset without that
    point closes its stale RUNNING child; a rerun with it adopts and finishes it. Each point ends with
    exactly one FINISHED child, none RUNNING, and the results of an uninterrupted sweep."""
    out, preset = tmp_path / "sweep", tmp_path / "faultsweep.yaml"
    cmd, env = sweep_cli(prepared, annotations, tokenizer_dir, preset, out, [40, 60])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        kill_during_second_point(proc, out, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    [first] = [read_json(p) for p in out.glob("runs/*/metrics.json")]  # killed during the second point
    stuck = [r for r in children(out) if r.info.status == "RUNNING"]
    assert len(stuck) == 1 and stuck[0].data.tags["config_key"] != first["config_key"]

    cmd, env = sweep_cli(prepared, annotations, tokenizer_dir, preset, out, [first["d"]])  # the point dropped
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    closed = {r.info.run_id: r for r in children(out)}[stuck[0].info.run_id]
    assert closed.info.status == "KILLED" and "closed by its sweep" in closed.data.tags["error"]

    cmd, env = sweep_cli(prepared, annotations, tokenizer_dir, preset, out, [40, 60])  # and back
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = children(out)
    rows = read_jsonl(out / "results-data.jsonl")
    assert sorted(r.data.tags["config_key"] for r in runs) == sorted(r["config_key"] for r in rows)
    assert {r.info.status for r in runs} == {"FINISHED"}  # the stale run adopted: no duplicate, none RUNNING
    assert stuck[0].info.run_id in {r.info.run_id for r in runs}

    assert_same_results(rows, sweep_reference)


def test_sigtermed_sweep_ends_killed_with_its_cause_then_reruns_to_one_finished_child_per_point(
        prepared, annotations, tokenizer_dir, tmp_path, sweep_reference):
    """SIGTERM a real `drscaling sweep` while its second point trains: the point checkpoints and ends
    KILLED, the sweep's parent run ends KILLED with the cause (as a point does), the process exits 130
    with one line. A rerun adopts both runs: one FINISHED child per point, none RUNNING, the results of
    an uninterrupted sweep."""
    out, preset, experiment = tmp_path / "sweep", tmp_path / "faultsweep.yaml", "faults-sweep-term"
    cmd, env = sweep_cli(prepared, annotations, tokenizer_dir, preset, out, [40, 60], experiment)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        kill_during_second_point(proc, out, signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert "drscaling: stopped: SIGTERM at step" in err
    parent = mlflow.get_run(read_json(out / "parent-faultsweep-data.json")["run_id"])
    assert parent.info.status == "KILLED" and parent.data.tags["error"].startswith("Terminated: SIGTERM at step")
    runs = {r.info.status: r for r in children(out, experiment)}
    assert sorted(runs) == ["FINISHED", "KILLED"] and "Terminated" in runs["KILLED"].data.tags["error"]
    [ckpt] = out.glob("runs/*/checkpoint/checkpoint.pt")  # the stopped point saved where it was

    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    after = children(out, experiment)
    assert {r.info.run_id for r in after} == {r.info.run_id for r in runs.values()}  # adopted, none added
    assert {r.info.status for r in after} == {"FINISHED"}
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED" and not ckpt.exists()
    rows = read_jsonl(out / "results-data.jsonl")
    assert sorted(r.data.tags["config_key"] for r in after) == sorted(r["config_key"] for r in rows)
    assert_same_results(rows, sweep_reference)


def test_a_sigterm_after_the_last_step_stops_the_loop_around_it():
    """A real SIGTERM that a training run (or annotation) no longer acts on, because it came after its
    last boundary, reaches the handler outside it: a sweep stops instead of starting its next point."""
    from drscaling.signals import Terminated, sigterm_at_boundary, sigterm_raises

    before = signal.getsignal(signal.SIGTERM)  # not always SIG_DFL: ray.init in an earlier test installs its own
    with pytest.raises(Terminated), sigterm_raises():
        with sigterm_at_boundary() as term:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 10
            while not term["term"] and time.time() < deadline:
                time.sleep(0.01)
            assert term["term"]  # deferred: nothing raised inside the block
        pytest.fail("the deferred SIGTERM was dropped when the block ended")
    assert signal.getsignal(signal.SIGTERM) == before


def test_truncated_checkpoint_is_refused_with_advice_then_discarded(prepared, annotations, tokenizer_dir, tmp_path,
                                                                     monkeypatch, reference):
    out = tmp_path / "run"
    p = Paths(prepared, annotations, tokenizer_dir, out)
    crash_after_checkpoint(monkeypatch, 12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(checkpoint_every=10), p)
    monkeypatch.undo()
    ckpt = out / "checkpoint" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(DrscalingError, match=r"unreadable.*--discard-checkpoint"):
        train(cfg(checkpoint_every=10), p)
    assert not (out / "metrics.json").exists()
    m = train(cfg(checkpoint_every=10), p, discard_checkpoint=True)
    assert m["ce_test_min"] == pytest.approx(reference["ce_test_min"], abs=1e-6)


def test_checkpoint_of_other_data_is_refused(prepared, annotations, tokenizer_dir, tmp_path, monkeypatch):
    changed = tmp_path / "annotations"
    shutil.copytree(annotations, changed)
    out = tmp_path / "run"
    crash_after_checkpoint(monkeypatch, 12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg(checkpoint_every=10), Paths(prepared, changed, tokenizer_dir, out))
    monkeypatch.undo()
    human = changed / "human.jsonl"
    lines = human.read_text().splitlines()
    human.write_text("\n".join(lines[:-5]) + "\n")  # new annotations between the kill and the rerun
    with pytest.raises(DrscalingError, match="other data"):
        train(cfg(checkpoint_every=10), Paths(prepared, changed, tokenizer_dir, out))
    assert not (out / "metrics.json").exists()

    # Starting afresh on the new data is a new MLflow run: the old one (its metrics, its dataset
    # inputs) belongs to the old data and is closed, not adopted and mixed with the new.
    old = read_json(out / "run.json")["run_id"]
    old_inputs = {d.dataset.digest for d in mlflow.get_run(old).inputs.dataset_inputs}
    done = train(cfg(checkpoint_every=10), Paths(prepared, changed, tokenizer_dir, out), discard_checkpoint=True)
    assert done["run_id"] != old
    closed, new = mlflow.get_run(old), mlflow.get_run(done["run_id"])
    assert closed.info.status == "FAILED" and "trained on other data" in closed.data.tags["superseded"]
    assert {d.dataset.digest for d in closed.inputs.dataset_inputs} == old_inputs
    assert new.info.status == "FINISHED" and new.data.tags["data_key"] == done["data_key"]
    assert closed.data.tags["data_key"] != done["data_key"]


def test_a_second_process_on_the_same_output_is_refused(prepared, annotations, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    with folder_lock(out, "a test holding it"):
        with pytest.raises(DrscalingError, match=r"in use by pid \d+"):
            train(cfg(), Paths(prepared, annotations, tokenizer_dir, out))
    assert not (out / "metrics.json").exists() and not (out / "run.json").exists()


def test_a_new_shared_tokenizer_is_new_data_for_scratch_shapes_only(prepared, annotations, tokenizer_dir, tmp_path):
    """A BERT shape from config tokenises with the shared vocabulary: a finished run on another vocabulary
    is not reused. Shapes on their checkpoint's own tokenizer (minilm) keep their key when it changes."""
    from drscaling.checkpoints import resolve_start
    from drscaling.data import load_split
    from drscaling.model.tokenizer import train_tokenizer

    tok = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tok)
    p = Paths(prepared, annotations, tok, tmp_path / "run")
    quick = cfg(steps=10, eval_every=5)
    first = train(quick, p)
    assert train(quick, p)["cached"]
    minilm = data_key(p, "human", resolve_start("minilm-L1", ""))
    train_split = load_split(prepared, "train")
    train_tokenizer(list(train_split.corpus["text"]) + list(train_split.queries["text"]), 1500, tok)
    assert data_key(p, "human", resolve_start("minilm-L1", "")) == minilm
    again = train(quick, p)
    assert not again.get("cached") and again["data_key"] != first["data_key"]


def test_a_checkpoint_write_without_room_fails_cleanly_and_leaves_nothing_partial(prepared, annotations,
                                                                                   tokenizer_dir, tmp_path):
    """A real `drscaling train` whose checkpoint write runs out of room (RLIMIT_FSIZE below the
    checkpoint's size, above everything written before it) ends with one clear line, no traceback, no
    checkpoint or result under their final names, no temporary folder, and its MLflow run FAILED."""
    import resource

    def limit() -> None:  # Python ignores SIGXFSZ: the write fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))

    out = tmp_path / "run"
    cmd, env = cli(prepared, annotations, tokenizer_dir, out, "faults-disk-full")
    cmd[cmd.index("--checkpoint-every") + 1] = "5"  # the first large file: before any model is saved
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a small store of its own, well under the limit
    r = subprocess.run(cmd, env=env | {"MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"drscaling: error: could not write {out / 'checkpoint'}: torch.save failed" in r.stderr
    assert not (out / "checkpoint").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob(".checkpoint.*"))  # the temporary copy it was writing is gone too
    [run] = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("faults-disk-full").experiment_id])
    assert run.info.status == "FAILED"


def test_a_sweep_point_checkpointed_on_other_data_gives_advice_a_sweep_can_follow(prepared, annotations, tokenizer_dir,
                                                                                  tmp_path, monkeypatch):
    """A sweep interrupted mid-point, then new annotations: the sweep refuses to mix them, naming what
    its user can do (`drscaling sweep` has no --discard-checkpoint); doing it, the sweep finishes."""
    changed = tmp_path / "annotations"
    shutil.copytree(annotations, changed)
    preset = tmp_path / "faultsweep.yaml"
    preset.write_text(yaml.safe_dump({"name": "faultsweep", "data": {"shape": "bert-L2-H128", "train_pairs": [40]},
                                      "train": SWEEP_TRAIN | {"steps": 10, "eval_every": 5, "checkpoint_every": 5}}))
    paths, out = Paths(prepared, changed, tokenizer_dir, Path("unused")), tmp_path / "sweep"
    crash_after_checkpoint(monkeypatch, 7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sweep(load_preset(str(preset)), paths, {}, out, "data")
    monkeypatch.undo()
    [ckpt] = out.glob("runs/*/checkpoint")
    human = changed / "human.jsonl"
    human.write_text("\n".join(human.read_text().splitlines()[:-5]) + "\n")
    with pytest.raises(DrscalingError, match="other data") as info:
        run_sweep(load_preset(str(preset)), paths, {}, out, "data")
    message = str(info.value)
    assert f"delete {ckpt} " in message
    assert "--discard-checkpoint" not in message or "`drscaling train`" in message  # a flag only train has
    shutil.rmtree(ckpt)
    [row] = read_jsonl(run_sweep(load_preset(str(preset)), paths, {}, out, "data"))
    assert read_json(ckpt.parent / "metrics.json")["data_key"] == run_data_key(paths, cfg(steps=10))
    assert row["ce_test_min"] == read_json(ckpt.parent / "metrics.json")["ce_test_min"]


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    """Checkpoints load with weights_only: a pickle that would run code when loaded is refused with a
    message of ours (torch's own text advises weights_only=False), and its code never runs."""
    import torch

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    (tmp_path / "checkpoint").mkdir()
    torch.save({"state": Payload(), "model": {}}, tmp_path / "checkpoint" / "checkpoint.pt")
    with pytest.raises(DrscalingError, match=r"holds objects other than tensors.*not loaded.*delete .*checkpoint") as info:
        read_checkpoint(tmp_path / "checkpoint", cfg())
    assert "weights_only" not in str(info.value) and not ran.exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_second_real_process_on_a_busy_output_is_refused(prepared, annotations, tokenizer_dir, tmp_path, command):
    """Two real `drscaling train` (or `drscaling sweep`) processes on one --out: the second is refused
    at once with a clear message while the first trains; the first is not disturbed. The first run is
    too long to finish before the second has started up, however slow the machine: it ends by SIGTERM."""
    if command == "train":
        out = tmp_path / "run"
        cmd, env = cli(prepared, annotations, tokenizer_dir, out, "faults-busy-train")
        cmd += ["--steps", "100000"]
        started = out / "run.json"
    else:
        out = tmp_path / "sweep"
        cmd, env = sweep_cli(prepared, annotations, tokenizer_dir, tmp_path / "faultsweep.yaml", out, [40],
                             train=SWEEP_TRAIN | {"steps": 100000})
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        if command == "sweep":
            deadline = time.time() + 300
            while not list(out.glob("runs/*/run.json")) and first.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            started = next(iter(out.glob("runs/*/run.json")))
        wait_for(started, first)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert first.poll() is None, "the first process ended before the second was refused"
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"drscaling: error: {out} is in use by pid {first.pid}" in second.stderr
    assert first.returncode == 130 and "SIGTERM at step" in err  # the first trained on, undisturbed


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt("SIGTERM"), "KILLED"), (ValueError("bad input"), "FAILED")])
def test_a_stage_run_interrupted_or_failing_ends_with_its_cause(mlflow_tmp, exc, status):
    """Every stage's MLflow run (fit, report, budget, export, measure, evaluate, distill) goes through
    tracking.stage_run: a SIGTERM (KeyboardInterrupt) ends it KILLED, an error FAILED, each with its cause."""
    from drscaling import tracking

    with pytest.raises(type(exc)), tracking.stage_run("faults-stage", "interrupted", {"drscaling.stage": "fit"}) as run:
        raise exc
    got = mlflow_tmp.get_run(run.info.run_id)
    assert got.info.status == status and str(exc) in got.data.tags["error"] and mlflow_tmp.active_run() is None
    with tracking.stage_run("faults-stage", "fine", {"drscaling.stage": "fit"}) as ok:
        pass
    assert mlflow_tmp.get_run(ok.info.run_id).info.status == "FINISHED"
