"""benchmarks/gpu_check.py on this CPU machine: the dry run measures every section, and a full run
without CUDA stops at once. Both run the script as the GPU machine will (PYTHONPATH=src, a fresh
interpreter); the dry run with mlflow, tritonclient and great_expectations blocked from import,
since that machine has none of them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
BLOCKED = ("mlflow", "tritonclient", "great_expectations")
# The figures each section must report as finite, positive numbers.
REQUIRED = {
    "matmul_peak": ["median_s", "tflops_median", "tflops_best"],
    "train_eager": ["step_ms", "tokens_per_s", "model_tflops_per_s", "mfu", "mfu_with_attention", "n_non_embedding"],
    "evaluation": ["passages_per_s_encode", "passages_per_s_forward", "tokens_per_passage"],
    "inference_torch": ["throughput_seq_per_s", "latency_p50_ms", "latency_p99_ms"],
    "inference_onnx": ["throughput_seq_per_s", "latency_p50_ms", "latency_p99_ms", "export_s"],
    "generation": ["queries_per_s", "new_tokens_per_s", "params"],
    "train_compiled": ["step_ms", "tokens_per_s", "mfu", "mfu_with_attention", "first_step_s"],
    "matmul_peak_after": ["median_s", "tflops_median"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def test_dry_run_reports_every_section(tmp_path):
    out = tmp_path / "g.json"
    # setting a module to None in sys.modules makes any import of it raise ImportError
    wrapper = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--dry-run', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["skipped"] == {}
    assert report["meta"]["dry_run"] is True
    assert set(report["sections"]) == set(REQUIRED) | {"train_ablation", "train_profile"}
    assert "Self CPU" in report["sections"]["train_profile"]["table"]
    variants = report["sections"]["train_ablation"]["variants"]
    assert set(variants) == {"no_dropout", "no_clip", "bf16_weights", "all_three", "all_three_compiled", "no_mask",
                             "no_mask_all_three_compiled", "compiled_max_autotune", "all_three_max_autotune",
                             "all_three_tuned_pointwise", "compiled_tuned_pointwise", "master_weights",
                             "master_weights_compiled"}
    assert all(math.isfinite(v["step_ms"]) and v["step_ms"] > 0 for v in variants.values())
    for section, keys in REQUIRED.items():
        for key in keys:
            value = report["sections"][section][key]
            assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (section, key, value)
    assert report["sections"]["train_eager"]["attn_implementation"] == "sdpa"
    assert report["sections"]["train_eager"]["vocab"] == 30522
    assert "onnxruntime CUDA provider not available" in report["sections"]["inference_torch"]["label"]
    assert math.isfinite(report["sections"]["train_eager"]["final_loss"])
    assert "total wall time" in proc.stdout.splitlines()[-1]  # the table comes last


def test_without_cuda_exits_2_naming_dry_run(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()  # stopped before measuring anything


def _script_module():
    """gpu_check loaded by path, as gpu_train (its training sections): it puts benchmarks/ on sys.path."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return importlib.import_module("gpu_train")


def test_ablation_keeps_to_the_loan():
    """On a GPU the autotuning variants run only when named (their compile outlasted 4.5 min on an
    H100, 190 s on an H200), and a variant not started while time is left is listed as skipped, not run."""
    g = _script_module()
    on_gpu = g.default_variants(dry_run=False)
    assert on_gpu and not set(on_gpu) & {n for n in g.ABLATION if "autotune" in n or "tuned" in n}
    assert g.default_variants(dry_run=True) == list(g.ABLATION)
    import gpu_common

    ctx = gpu_common.Ctx("cpu", gpu_common.DRY, tokenizer=None, ort_providers=[], dry_run=True)
    out = g.ablation(ctx, ["no_dropout", "all_three"], time_left=lambda: -1.0)
    assert out["variants"] == {} and out["skipped_for_time"] == ["no_dropout", "all_three"]


def test_master_weights_update_like_adamw_on_the_model(tmp_path):
    """The master-weights candidate applies AdamW's update in fp32 and copies it back into the model:
    in fp32 (this CPU) three steps of it leave the model where the shipped optimiser does, and the
    weights do move (a missing copy-back would leave them where they started)."""
    import torch

    from drscaling.model.build import build_model
    from drscaling.model.encoder import Towers
    from drscaling.train.step import optimizer, train_step

    g = _script_module()
    import gpu_common as c

    tokenizer = c.small_tokenizer(tmp_path / "tokenizer")
    q, p = g.train_batch(c.DRY)
    models = []
    for master in (False, True):
        encoder, _ = build_model("bert-L2-H128", c.VocabSized(tokenizer, c.DRY.vocab), dim=32, seed=0)
        model = Towers(encoder).eval()  # no dropout: both runs see the same forward
        if master:
            opt = g.MasterWeights(model, lr=1e-3, weight_decay=0.01)
            sched = opt.sched
        else:
            opt, sched = optimizer(model, lr=1e-3, weight_decay=0.01, warmup_steps=0)
        start = [w.detach().clone() for w in model.parameters()]
        for _ in range(3):
            train_step(model, opt, sched, q, p, c.DRY.batch, False, torch.autocast("cpu", enabled=False), "cpu",
                       max_grad_norm=1.0)
        assert max((w - s).abs().max().item() for w, s in zip(model.parameters(), start, strict=True)) > 1e-4
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ablation_in_fresh_processes_reports_each_variant_with_its_own_peak(tmp_path):
    """--fresh-processes: every variant is measured by a new process of the script, against that process's
    own matmul peak."""
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--only", "train_ablation", "--fresh-processes",
                           "--ablation", "no_dropout", "master_weights", "--out", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = json.loads(out.read_text())["sections"]["train_ablation"]
    assert section["processes"] == "one per variant" and section["failed"] == {}
    assert list(section["variants"]) == ["no_dropout", "master_weights"]
    for row in section["variants"].values():
        assert row["step_ms"] > 0 and row["peak_tflops"] > 0 and math.isfinite(row["final_loss"])


def test_a_variant_process_past_its_time_is_killed(tmp_path):
    import time

    g = _script_module()
    t0 = time.monotonic()
    out = g.ablation_in_processes(SCRIPT, ["no_dropout", "no_clip"], True, time_left=lambda: 1.0, grace_s=1.0)
    assert time.monotonic() - t0 < 30
    assert out["variants"] == {} and set(out["failed"]) == {"no_dropout", "no_clip"}
    assert all(why.startswith("killed after 2 s") for why in out["failed"].values())
    left = subprocess.run(["pgrep", "-f", "gpu-check-variant-"], capture_output=True, text=True)
    assert left.stdout == "", f"variant processes left running: {left.stdout}"


def test_a_killed_variant_leaves_no_temp_files(tmp_path):
    """A variant process killed past its time cannot clean up after itself: what it made in its temp
    folder goes with the folder its parent gave it. The stand-in variant makes a temp folder at once,
    then outlasts its time."""
    slow = tmp_path / "slow_variant.py"
    slow.write_text("import tempfile, time\ntempfile.mkdtemp(prefix='gpu-check-slow-')\ntime.sleep(300)\n")
    temp = Path(tempfile.gettempdir())
    before = set(temp.glob("gpu-check-*"))
    out = _script_module().ablation_in_processes(slow, ["no_dropout"], True, time_left=lambda: 1.0, grace_s=4.0)
    assert set(out["failed"]) == {"no_dropout"}
    assert set(temp.glob("gpu-check-*")) == before, "a killed variant left its temp folder behind"
