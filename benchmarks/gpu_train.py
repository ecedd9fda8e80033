"""The training sections of benchmarks/gpu_check.py: train_step timed eager and compiled, its MFU, the
ablation of what keeps MFU down, and the profile."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_common import Ctx, Sizes, build_encoder, free_memory, peak_memory_gib, reset_memory, stats, sync, wall_times

MFU_TARGET = 0.40
VARIANT_GRACE_S = 120.0  # a variant in its own process, started just inside the budget, may run this long past it
TUNED_POINTWISE = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}
# Where the step's time goes: each variant changes one thing against train_eager.
ABLATION = {"no_dropout": {"dropout": False}, "no_clip": {"clip": 0.0}, "bf16_weights": {"bf16_weights": True},
            "all_three": {"dropout": False, "clip": 0.0, "bf16_weights": True},
            "all_three_compiled": {"dropout": False, "clip": 0.0, "bf16_weights": True, "compiled": True},
            # the shipped recipe (dropout, clipping) with the model in bf16 and AdamW on fp32 master copies:
            # the shippable form of "bf16 parameters", a candidate measured here before it is built in
            "master_weights": {"master_weights": True},
            "master_weights_compiled": {"master_weights": True, "compiled": True},
            "no_mask": {"mask": False},
            "no_mask_all_three_compiled": {"dropout": False, "clip": 0.0, "bf16_weights": True, "compiled": True,
                                           "mask": False},
            # inductor's autotuned GEMM/fusion templates (minutes of compile, no CUDA graphs: the step's
            # optimizer and clipping run outside the compiled module)
            "compiled_max_autotune": {"compiled": True, "compile_mode": "max-autotune-no-cudagraphs"},
            "all_three_max_autotune": {"dropout": False, "clip": 0.0, "bf16_weights": True, "compiled": True,
                                       "compile_mode": "max-autotune-no-cudagraphs"},
            # autotune only the fused pointwise/norm kernels (the step's memory-bound part; the GEMMs stay
            # cuBLAS, which the profile found near the peak): fewer choices than max-autotune's GEMM templates
            "all_three_tuned_pointwise": {"dropout": False, "clip": 0.0, "bf16_weights": True, "compiled": True,
                                          "compile_options": TUNED_POINTWISE},
            "compiled_tuned_pointwise": {"compiled": True, "compile_options": TUNED_POINTWISE}}
# Variants whose autotuning compile outlasted a loan's slot: 4.5 min (max-autotune, H100) and 190 s
# (tuned pointwise, H200) without one measured step (BENCHMARKS.md). They run only when named.
SLOW_COMPILE = ("compiled_max_autotune", "all_three_max_autotune", "all_three_tuned_pointwise",
                "compiled_tuned_pointwise")


def train_batch(s: Sizes) -> tuple[dict, dict]:
    """Host tensors of random token ids over the whole vocabulary, no padding (full-length texts)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n_p = s.batch + s.negatives
    q = {"input_ids": torch.randint(5, s.vocab, (s.batch, s.query_len), generator=g),
         "attention_mask": torch.ones(s.batch, s.query_len, dtype=torch.long)}
    p = {"input_ids": torch.randint(5, s.vocab, (n_p, s.passage_len), generator=g),
         "attention_mask": torch.ones(n_p, s.passage_len, dtype=torch.long)}
    return q, p


def step_flops(n: int, layers: int, hidden: int, s: Sizes) -> tuple[int, float, float]:
    """(tokens per step, 6*N*T, 6*N*T + attention-score FLOPs); see the module docstring."""
    n_p = s.batch + s.negatives
    tokens = s.batch * s.query_len + n_p * s.passage_len
    attention = 12 * layers * hidden * (s.batch * s.query_len**2 + n_p * s.passage_len**2)
    return tokens, 6 * n * tokens, 6 * n * tokens + attention


class MasterWeights:
    """AdamW (drscaling.train.step.optimizer) over fp32 master copies of a low-precision model, in the
    optimiser interface train_step uses: the model computes in bf16 with no per-use casts of its weights,
    while every update is applied in fp32 (bf16 parameters alone lose updates below their precision)."""

    def __init__(self, model: Any, lr: float, weight_decay: float):
        import torch

        from drscaling.train.step import optimizer

        self.params = list(model.parameters())
        self.master = torch.nn.ParameterList([torch.nn.Parameter(p.detach().float().clone()) for p in self.params])
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.opt, self.sched = optimizer(self.master, lr=lr, weight_decay=weight_decay, warmup_steps=0)
        self.defaults = self.opt.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        pairs = [(m.grad, p.grad) for m, p in zip(self.master, self.params, strict=True) if p.grad is not None]
        with torch.no_grad():
            torch._foreach_copy_([m for m, _ in pairs], [g for _, g in pairs])  # bf16 grads into fp32
            self.opt.step()
            torch._foreach_copy_(self.params, list(self.master))  # fp32 weights back into the bf16 model


def train(ctx: Ctx, compiled: bool, dropout: bool = True, clip: float = 1.0, bf16_weights: bool = False,
          mask: bool = True, compile_mode: str | None = None, compile_options: dict | None = None,
          master_weights: bool = False) -> dict:
    """Median wall time of drscaling.train.step.train_step, eager or with the Towers module compiled.
    The keyword options are the ablation's: dropout off, no gradient clipping, bf16 parameters, a bf16
    model with fp32 master weights."""
    import torch

    from drscaling.model.encoder import Towers
    from drscaling.train.step import optimizer, train_step

    s, device = ctx.sizes, ctx.device
    reset_memory(device)
    encoder, meta = build_encoder(ctx)
    if not dropout:
        for module in encoder.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        encoder.backbone.config.attention_probs_dropout_prob = 0.0
    if not mask:  # the batch has no padding: without a mask SDPA may take the flash-attention kernel
        backbone_forward = encoder.backbone.forward
        encoder.backbone.forward = lambda input_ids, attention_mask=None, **kw: backbone_forward(input_ids=input_ids, **kw)
    model = Towers(encoder).to(device).train()
    if bf16_weights and ctx.bf16:
        model = model.to(torch.bfloat16)
    if master_weights:  # a CPU dry run keeps fp32 (ctx.dtype) and checks the code path
        model = model.to(ctx.dtype)
        master = MasterWeights(model, lr=1e-4, weight_decay=0.01)
        opt, sched = master, master.sched
    else:
        opt, sched = optimizer(model, lr=1e-4, weight_decay=0.01, warmup_steps=0)  # fused AdamW on CUDA
    q, p = train_batch(s)
    autocast = ctx.autocast()
    # torch.compile takes inductor's mode or its options; the dry run's aot_eager only checks the capture
    mode = {"options": compile_options} if compile_options else {"mode": compile_mode} if compile_mode else {}
    mode = mode if s.compile_backend == "inductor" else {}
    step_model = torch.compile(model, backend=s.compile_backend, **mode) if compiled else model
    last: list[torch.Tensor] = []

    def step() -> None:
        last[:] = [train_step(step_model, opt, sched, q, p, s.batch, False, autocast, device, max_grad_norm=clip)]

    row: dict[str, Any] = {}
    if compiled:  # the first call compiles: timed apart, then the usual warm-up
        t = time.perf_counter()
        step()
        sync(device)
        row["compile_backend"] = s.compile_backend
        options = "options " + json.dumps(mode["options"]) if "options" in mode else "default"
        row["compile_mode"] = mode.get("mode") or options
        row["first_step_s"] = time.perf_counter() - t
    times = wall_times(step, device, s.warmup, s.repeats)
    cfg = encoder.backbone.config
    tokens, model_flops, with_attention = step_flops(meta.n_non_embedding, cfg.num_hidden_layers, cfg.hidden_size, s)
    sec = statistics.median(times)
    row |= {
        "shape": s.shape, "vocab": cfg.vocab_size, "precision": f"{ctx.dtype_name} autocast" if ctx.bf16 else "fp32",
        "attn_implementation": cfg._attn_implementation,
        "n_non_embedding": meta.n_non_embedding, "batch": s.batch, "negatives": s.negatives,
        "query_len": s.query_len, "passage_len": s.passage_len, "tokens_per_step": tokens,
        "optimizer_fused": bool(opt.defaults.get("fused")), **stats(times),
        "step_ms": sec * 1e3, "tokens_per_s": tokens / sec, "model_tflops_per_s": model_flops / sec / 1e12,
        "final_loss": last[0].detach().item(), "peak_mem_gib": peak_memory_gib(device),
    }
    if ctx.peak_flops:
        row |= {"mfu": model_flops / sec / ctx.peak_flops, "mfu_with_attention": with_attention / sec / ctx.peak_flops,
                "mfu_target": MFU_TARGET, "meets_target": model_flops / sec / ctx.peak_flops >= MFU_TARGET}
    if not math.isfinite(row["final_loss"]):
        raise FloatingPointError(f"non-finite loss {row['final_loss']} after {len(times)} steps")
    return row


def default_variants(dry_run: bool) -> list[str]:
    """Every variant in a dry run (a code check); on a GPU all but SLOW_COMPILE."""
    return [n for n in ABLATION if dry_run or n not in SLOW_COMPILE]


def ablation(ctx: Ctx, names: list[str] | None = None, time_left: Callable[[], float] = lambda: math.inf) -> dict:
    """train_eager with one change at a time (and all three): which overhead keeps MFU down.
    A variant not started while time is left is listed as skipped (the loan is short)."""
    rows: dict[str, dict] = {}
    skipped: list[str] = []
    for name in names or default_variants(ctx.dry_run):
        opts = ABLATION[name]
        if time_left() <= 0:
            skipped.append(name)
            continue
        r = train(ctx, **({"compiled": False} | opts))
        rows[name] = {k: r.get(k) for k in ("step_ms", "tokens_per_s", "mfu", "peak_mem_gib", "final_loss", "first_step_s", "compile_mode")}
        free_memory()
    return {"variants": rows, "shape": ctx.sizes.shape, "skipped_for_time": skipped}


def ablation_in_processes(script: Path, names: list[str], dry_run: bool, time_left: Callable[[], float],
                          grace_s: float = VARIANT_GRACE_S) -> dict:
    """The ablation with each variant in a fresh process of this script (its own CUDA context, caching
    allocator, compile caches and matmul peak, which its MFU is taken against): run one after another in
    one process, the same variant measured 12% apart (H200, BENCHMARKS.md). A process that outlasts the
    time left plus grace_s is killed with its compile workers, and recorded as failed."""
    rows: dict[str, dict] = {}
    skipped: list[str] = []
    failed: dict[str, str] = {}
    for name in names:
        left = time_left()
        if left <= 0:
            skipped.append(name)
            continue
        with tempfile.TemporaryDirectory(prefix="gpu-check-variant-") as tmp:
            out = Path(tmp) / "variant.json"
            cmd = [sys.executable, str(script), "--only", "train_ablation", "--ablation", name, "--out", str(out),
                   *(["--dry-run"] if dry_run else [])]
            # its own group: inductor's workers end with it; its temp files (inductor's cache too, so
            # every variant compiles cold) go in tmp, which goes even when the process is killed
            proc = subprocess.Popen(cmd, start_new_session=True, env=os.environ | {"TMPDIR": tmp})
            try:
                proc.wait(timeout=left + grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                failed[name] = f"killed after {left + grace_s:.0f} s"
                continue
            data = json.loads(out.read_text()) if out.exists() else {}
        sections = data.get("sections", {})
        row = sections.get("train_ablation", {}).get("variants", {}).get(name)
        if row is None:
            failed[name] = f"exit status {proc.returncode}: {json.dumps(data.get('errors', {}))[:500]}"
            continue
        rows[name] = row | {"peak_tflops": sections.get("matmul_peak", {}).get("tflops_median")}
    return {"variants": rows, "skipped_for_time": skipped, "failed": failed, "processes": "one per variant"}


def profile(ctx: Ctx) -> dict:
    """torch.profiler over 3 eager train steps: the kernels the step's time goes to (top 15 by device time)."""
    import torch
    from torch.profiler import ProfilerActivity

    from drscaling.model.encoder import Towers
    from drscaling.train.step import optimizer, train_step

    s, device = ctx.sizes, ctx.device
    encoder, _ = build_encoder(ctx)
    model = Towers(encoder).to(device).train()
    opt, sched = optimizer(model, lr=1e-4, weight_decay=0.01, warmup_steps=0)
    q, p = train_batch(s)

    def step() -> None:
        train_step(model, opt, sched, q, p, s.batch, False, ctx.autocast(), device, max_grad_norm=1.0)

    for _ in range(3):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)
    print(table, flush=True)
    return {"sort_by": key, "table": table, "steps": 3}
