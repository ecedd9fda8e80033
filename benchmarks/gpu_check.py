"""One-shot GPU check for a short loan of one Hopper GPU (H100 or H200): training MFU, evaluation,
inference, generation.

Sized to run in about 4 minutes (hard internal budget: sections and ablation variants still to come are
skipped once 360 s have passed, so a compiled variant started just before ends inside 8 minutes) on a machine that has torch and transformers but no MLflow, Triton or internet. It
imports only what it measures (drscaling.model, drscaling.train.step, drscaling.export's ONNX
exporter when onnxruntime has a CUDA provider) and builds every model from config with random
weights, so nothing outside src/ and benchmarks/ is needed:

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out $OUT/gpu.json        # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/g.json      # CPU check, tiny sizes

A dry run shrinks every size (bert-L2-H128, batch 4, a 2-layer Llama) and, on a CPU, computes in fp32
(bf16 autocast disabled): it checks the code paths, its numbers mean nothing.

Sections, each in its own try/except, written to --out after every section, table printed last:
  matmul_peak         8192^3 bf16 matmul, median of 10 after warm-up (CUDA events): the peak MFU
                      is measured against, on the same GPU in the same run (again at the end: drift)
  train_eager         drscaling.train.step.train_step at bert-L12-H768 (vocab 30522), bf16 autocast,
                      batch 128, query 25 / passage 180 tokens, 256 shared negatives, fused AdamW,
                      clipping at 1.0; median step wall time; MFU (target >= 40%)
  train_compiled      the same with torch.compile of the Towers module
  evaluation          drscaling.model.retriever.encode under bf16 autocast, batch 512 x 180 tokens: end to end
                      (tokenise, copy, forward, copy back) and forward only on device tensors
  inference_torch     encoder with bf16 weights: batch 32 throughput and batch 1 p50/p99 latency
  inference_onnx      the exported graph at fp16 in onnxruntime's CUDA provider (skipped, with the
                      reason, when that provider is missing; the torch row then says so)
  generation          SmolLM2-135M-shaped LlamaForCausalLM, bf16, 64 prompts of 64 tokens, greedy,
                      exactly 32 new tokens: queries/s

MFU = 6 * N * T / step_s / peak, N = non-embedding parameters (ModelMeta.n_non_embedding, Kaplan's
count: no embedding update, no attention scores), T = tokens per step = B*25 + (B+K)*180. The
"with attention" variant adds the attention-score FLOPs of forward and backward:
12 * L * H * s per token of a length-s sequence (QK^T and AV, 2*s*H multiply-adds each per token
and layer, x3 for backward), i.e. 12*L*H*(B*25^2 + (B+K)*180^2) per step.

Exit status: 0 when every section ran (or was skipped for time), 1 when one failed (its error is in
the JSON's "errors"), 2 without a CUDA device and without --dry-run (at once: only torch is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_CUDA = ("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
           "run with --dry-run to check the script on CPU")
BUDGET_S = 360.0  # sections not started by then are skipped: the whole loan is ~15 min, start-up included
MFU_TARGET = 0.40
PAPER_VOCAB = 30522  # bert-base-uncased's vocabulary: sets the embedding table the optimiser updates


@dataclass(frozen=True)
class Sizes:
    shape: str
    vocab: int
    batch: int
    negatives: int
    query_len: int
    passage_len: int
    matmul: int
    matmul_repeats: int
    warmup: int
    repeats: int
    eval_batch: int
    eval_batches: int
    eval_len: int
    eval_repeats: int
    infer_batch: int
    infer_len: int  # benchmarks/serving.py's default sequence length
    infer_repeats: int
    latency_repeats: int
    llm: dict[str, int]
    gen_batch: int
    prompt_len: int
    new_tokens: int
    gen_repeats: int
    compile_backend: str


SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}
FULL = Sizes(
    shape="bert-L12-H768", vocab=PAPER_VOCAB, batch=128, negatives=256, query_len=25, passage_len=180,
    matmul=8192, matmul_repeats=10, warmup=3, repeats=10,
    eval_batch=512, eval_batches=6, eval_len=180, eval_repeats=3,
    infer_batch=32, infer_len=64, infer_repeats=20, latency_repeats=200,
    llm=SMOLLM2_135M, gen_batch=64, prompt_len=64, new_tokens=32, gen_repeats=3,
    compile_backend="inductor",
)
# Every size shrunk so the whole script runs on 2 CPU cores in well under a minute. The compile
# backend is aot_eager: it checks that dynamo and AOTAutograd capture the step without spending a
# minute in inductor's C++ code generation.
DRY = Sizes(
    shape="bert-L2-H128", vocab=PAPER_VOCAB, batch=4, negatives=8, query_len=8, passage_len=16,
    matmul=256, matmul_repeats=5, warmup=2, repeats=3,
    eval_batch=16, eval_batches=2, eval_len=32, eval_repeats=2,
    infer_batch=4, infer_len=16, infer_repeats=3, latency_repeats=20,
    llm={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 1000},
    gen_batch=2, prompt_len=8, new_tokens=4, gen_repeats=2, compile_backend="aot_eager",
)
SECTIONS = ("matmul_peak", "train_eager", "evaluation", "inference_torch", "inference_onnx",
            "generation", "train_compiled", "train_ablation", "train_profile", "matmul_peak_after")
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


# ---------------------------------------------------------------------------------------------
# Report: every number goes to --out as soon as its section ends
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    path: Path | None
    meta: dict[str, Any]
    t0: float = field(default_factory=time.perf_counter)
    sections: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn: Callable[[], dict], budget_s: float) -> None:
        """Run one section; a failure is recorded and the next section still runs."""
        if self.elapsed() > budget_s:
            self.skipped[name] = f"time budget: {self.elapsed():.0f} s > {budget_s:.0f} s"
        else:
            print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
            try:
                self.sections[name] = fn()
            except Exception as exc:  # one broken measurement must not lose the others
                self.errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
                traceback.print_exc()
            finally:
                free_memory()
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = {"meta": self.meta, "sections": self.sections, "errors": self.errors,
                "skipped": self.skipped, "wall_s": round(self.elapsed(), 2)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, self.path)  # a run killed mid-write still leaves the last whole file


@dataclass
class Ctx:
    device: str
    sizes: Sizes
    tokenizer: Any  # a small trained WordPiece tokenizer (real texts for encode and the exporter)
    ort_providers: list[str]
    dry_run: bool
    peak_flops: float | None = None

    @property
    def bf16(self) -> bool:
        # bf16 on any GPU; a CPU dry run computes in fp32 (bf16 is emulated, slow and noisy on
        # CPUs without AMX), through the same autocast context, disabled
        return self.device == "cuda"

    @property
    def dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> Any:
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)


# ---------------------------------------------------------------------------------------------
# Timing helpers (METHOD.md: warm up, synchronise, median of repeats, random data)
# ---------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def wall_times(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> list[float]:
    """Host wall time per call with the device drained after each: what a training loop sees,
    host-side work (pinning, launches, the optimiser's Python) included."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def event_times(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Device time per call from CUDA events (for one kernel-bound call, free of host jitter)."""
    import torch

    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


def stats(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def reset_memory(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def matmul_peak(ctx: Ctx) -> dict:
    """Matmul throughput (bf16; fp32 in a CPU dry run) on random operands (zeros ran 13% faster on
    an H200 here)."""
    import torch

    n = ctx.sizes.matmul
    reset_memory(ctx.device)
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    if ctx.device == "cuda":
        times = event_times(lambda: a @ b, warmup=3, repeats=ctx.sizes.matmul_repeats)
    else:
        times = wall_times(lambda: a @ b, ctx.device, warmup=3, repeats=ctx.sizes.matmul_repeats)
    flops = 2 * n**3
    s = stats(times)
    if ctx.peak_flops is None:
        ctx.peak_flops = flops / s["median_s"]
    return {"size": n, "dtype": ctx.dtype_name, "timing": "cuda events" if ctx.device == "cuda" else "wall",
            **s, "tflops_median": flops / s["median_s"] / 1e12, "tflops_best": flops / s["min_s"] / 1e12,
            "peak_mem_gib": peak_memory_gib(ctx.device)}


class VocabSized:
    """A tokenizer stand-in for build_model, whose BertConfig takes vocab_size = len(tokenizer): the
    paper's 30522-token vocabulary without training one (the embedding update scales with it)."""

    def __init__(self, tokenizer: Any, size: int):
        self._tokenizer = tokenizer
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def use_sdpa(model: Any) -> None:
    """Ask for SDPA attention (the default in recent transformers); the rows record what is in use."""
    if hasattr(model, "set_attn_implementation"):
        with contextlib.suppress(ValueError, ImportError):  # unsupported: keep the model's own
            model.set_attn_implementation("sdpa")


def build_encoder(ctx: Ctx) -> tuple[Any, Any]:
    """The project's (Encoder, ModelMeta): bert-L{L}-H{H} from config with random weights, SDPA."""
    from drscaling.model.build import build_model

    encoder, meta = build_model(ctx.sizes.shape, VocabSized(ctx.tokenizer, ctx.sizes.vocab), dim=768, seed=0)
    use_sdpa(encoder.backbone)
    return encoder, meta


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


def synthetic_texts(n: int, words: int, seed: int = 0) -> list[str]:
    """Random sequences of the tokenizer's training words: every text tokenises past max_len."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, 4000, size=words)) for _ in range(n)]


def evaluation(ctx: Ctx) -> dict:
    """Passages/s of drscaling.model.retriever.encode (the evaluator's path) under bf16 autocast, end to end,
    and of the bare forward on device-resident token tensors of the same shape."""
    import torch

    from drscaling.model.retriever import encode
    from drscaling.model.tokenizer import tokenize

    s, device = ctx.sizes, ctx.device
    reset_memory(device)
    encoder, _ = build_encoder(ctx)
    encoder.to(device).eval()
    texts = synthetic_texts(s.eval_batch * s.eval_batches, s.eval_len + 32)
    seq = tokenize(ctx.tokenizer, texts[:2], s.eval_len)["input_ids"].shape[1]

    def run_encode() -> None:
        with ctx.autocast():
            out = encode(encoder, ctx.tokenizer, texts, s.eval_len, batch_size=s.eval_batch, device=device)
        assert out.shape[0] == len(texts) and bool(torch.isfinite(torch.from_numpy(out)).all())

    e2e = wall_times(run_encode, device, warmup=1, repeats=s.eval_repeats)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, s.vocab, (s.eval_batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def forward() -> None:
        with ctx.autocast():
            encoder(ids, mask)

    fwd = wall_times(forward, device, warmup=2, repeats=max(3, s.eval_repeats * 2))
    return {
        "shape": s.shape, "precision": f"{ctx.dtype_name} autocast" if ctx.bf16 else "fp32",
        "batch": s.eval_batch, "tokens_per_passage": seq, "passages": len(texts),
        "encode_timed": "drscaling.model.retriever.encode on texts: tokenise + copy + forward + copy back",
        "encode": stats(e2e), "passages_per_s_encode": len(texts) / statistics.median(e2e),
        "forward_timed": "Encoder forward on device token tensors (batch x tokens_per_passage)",
        "forward": stats(fwd), "passages_per_s_forward": s.eval_batch / statistics.median(fwd),
        "peak_mem_gib": peak_memory_gib(device),
    }


def percentile_ms(times: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(times) * 1e3, q))


def latency_and_throughput(run: Callable[[int], Any], ctx: Ctx) -> dict:
    """run(batch) does one inference of `batch` sequences of infer_len tokens."""
    s = ctx.sizes
    thr = wall_times(lambda: run(s.infer_batch), ctx.device, warmup=3, repeats=s.infer_repeats)
    lat = wall_times(lambda: run(1), ctx.device, warmup=5, repeats=s.latency_repeats)
    return {
        "seq_len": s.infer_len, "batch": s.infer_batch, "throughput": stats(thr),
        "throughput_seq_per_s": s.infer_batch / statistics.median(thr),
        "latency_p50_ms": percentile_ms(lat, 50), "latency_p99_ms": percentile_ms(lat, 99),
        "latency_n": len(lat),
    }


def inference_torch(ctx: Ctx) -> dict:
    """The encoder with its weights in bf16 (no per-call autocast casts: what a server would run)."""
    import torch

    device = ctx.device
    reset_memory(device)
    encoder, _ = build_encoder(ctx)
    encoder.to(device, dtype=ctx.dtype).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, ctx.sizes.vocab, (ctx.sizes.infer_batch, ctx.sizes.infer_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run(batch: int) -> None:
        encoder(ids[:batch], mask[:batch])

    has_ort_cuda = "CUDAExecutionProvider" in ctx.ort_providers
    label = f"torch {ctx.dtype_name}" + ("" if has_ort_cuda else " (onnxruntime CUDA provider not available)")
    row = {"label": label, "attn_implementation": encoder.backbone.config._attn_implementation}
    return row | latency_and_throughput(run, ctx) | {"peak_mem_gib": peak_memory_gib(device)}


def ort_plan(ctx: Ctx) -> tuple[str, str] | None:
    """(provider, graph variant) to time, or None: fp16 on CUDA when onnxruntime has that provider;
    in a dry run without it, the fp16 graph on the CPU provider, so the export path is exercised."""
    if "CUDAExecutionProvider" in ctx.ort_providers:
        return "CUDAExecutionProvider", "fp16"
    if ctx.dry_run and "CPUExecutionProvider" in ctx.ort_providers:
        return "CPUExecutionProvider", "fp16"
    return None


def inference_onnx(ctx: Ctx) -> dict:
    """The exported graph (drscaling.export's legacy-exporter path and fp16 conversion) in onnxruntime."""
    plan = ort_plan(ctx)
    if plan is None:
        return {"skipped": f"onnxruntime has no CUDAExecutionProvider (providers: {ctx.ort_providers})"}
    import numpy as np
    import onnxruntime

    from drscaling.export import VARIANT_FILES, _export_fp32, _make_variant, ort_session

    provider, variant = plan
    encoder, _ = build_encoder(ctx)
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        _export_fp32(encoder.eval(), ctx.tokenizer, folder / VARIANT_FILES["fp32"], opset=17)
        # _optimize reads heads/hidden from the shape recorded next to the graph
        (folder / "drscaling.json").write_text(json.dumps({"shape": ctx.sizes.shape}))
        if variant != "fp32":
            _make_variant(variant, folder)
        export_s = time.perf_counter() - t
        session = ort_session(folder / VARIANT_FILES[variant], providers=[provider])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()} instead of {provider}")
    rng = np.random.default_rng(3)
    ids = rng.integers(5, ctx.sizes.vocab, size=(ctx.sizes.infer_batch, ctx.sizes.infer_len), dtype=np.int64)
    mask = np.ones_like(ids)

    def run(batch: int) -> None:
        session.run(["embedding"], {"input_ids": ids[:batch], "attention_mask": mask[:batch]})

    row = {"label": f"onnxruntime {onnxruntime.__version__} {provider} {variant}", "export_s": export_s}
    return row | latency_and_throughput(run, ctx)


def generation(ctx: Ctx) -> dict:
    """Greedy generation of exactly new_tokens tokens for gen_batch prompts: queries/s."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s, device = ctx.sizes, ctx.device
    reset_memory(device)
    torch.manual_seed(0)
    config = LlamaConfig(**s.llm, tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    use_sdpa(model)
    model.to(device, dtype=ctx.dtype).eval()
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(5, s.llm["vocab_size"], (s.gen_batch, s.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    shapes: list[tuple[int, ...]] = []

    @torch.inference_mode()
    def run() -> None:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.new_tokens,
                             min_new_tokens=s.new_tokens, do_sample=False, pad_token_id=0)
        shapes.append(tuple(out.shape))

    times = wall_times(run, device, warmup=1, repeats=s.gen_repeats)
    if shapes[-1] != (s.gen_batch, s.prompt_len + s.new_tokens):
        raise RuntimeError(f"generate returned {shapes[-1]}, expected {(s.gen_batch, s.prompt_len + s.new_tokens)}")
    sec = statistics.median(times)
    return {
        "model": "LlamaForCausalLM from config (SmolLM2-135M shape)" if s.llm == SMOLLM2_135M else "tiny Llama",
        "params": sum(p.numel() for p in model.parameters()), "precision": ctx.dtype_name,
        "attn_implementation": model.config._attn_implementation,
        "batch": s.gen_batch, "prompt_len": s.prompt_len, "new_tokens": s.new_tokens, **stats(times),
        "queries_per_s": s.gen_batch / sec, "new_tokens_per_s": s.gen_batch * s.new_tokens / sec,
        "peak_mem_gib": peak_memory_gib(device),
    }


# ---------------------------------------------------------------------------------------------
# Set-up, table, main
# ---------------------------------------------------------------------------------------------


def small_tokenizer(dest: Path) -> Any:
    """A WordPiece vocabulary over synthetic words w0..w3999, as benchmarks/train_step.py makes."""
    from drscaling.model.tokenizer import train_tokenizer

    words = [f"w{i}" for i in range(4000)]
    return train_tokenizer([" ".join(words[i : i + 50]) for i in range(0, 4000, 10)], 8000, dest)


def environment(device: str, dry_run: bool, sizes: Sizes) -> dict:
    import torch
    import transformers

    try:
        import onnxruntime

        ort_version, providers = onnxruntime.__version__, list(onnxruntime.get_available_providers())
    except Exception as exc:  # not installed, or a broken build: inference_onnx is skipped
        ort_version, providers = f"unavailable ({type(exc).__name__}: {exc})", []
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device, "device_name": name, "python": platform.python_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
        "onnxruntime": ort_version, "ort_providers": providers, "dry_run": dry_run,
        "threads": torch.get_num_threads(), "sizes": dataclasses.asdict(sizes),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def section_line(name: str, r: dict) -> str:
    """One compact line per section for the final table."""
    if name.startswith("matmul_peak"):
        return f"{r['dtype']} {r['size']}^3: {r['tflops_median']:.1f} TFLOP/s median ({r['tflops_best']:.1f} best)"
    if name == "train_profile":
        return "top kernels by device time: see the table above and the JSON"
    if name == "train_ablation":
        return "; ".join(f"{k} {v['step_ms']:.1f} ms MFU {fmt(v.get('mfu'), '.1%')}" for k, v in r["variants"].items())
    if name.startswith("train"):
        first = f", first step {r['first_step_s']:.1f} s" if "first_step_s" in r else ""
        return (f"{r['shape']} step {r['step_ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, "
                f"MFU {fmt(r.get('mfu'), '.1%')} (+attn {fmt(r.get('mfu_with_attention'), '.1%')}, "
                f"target {MFU_TARGET:.0%}), {r['attn_implementation']}, mem {fmt(r['peak_mem_gib'])} GiB{first}")
    if name == "evaluation":
        return (f"encode {r['passages_per_s_encode']:.0f} passages/s end to end, "
                f"forward {r['passages_per_s_forward']:.0f} passages/s ({r['batch']} x {r['tokens_per_passage']}), "
                f"mem {fmt(r['peak_mem_gib'])} GiB")
    if name.startswith("inference"):
        if "skipped" in r:
            return r["skipped"]
        return (f"{r['label']}: b{r['batch']} {r['throughput_seq_per_s']:.0f} seq/s; "
                f"b1 p50 {r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms (seq {r['seq_len']})")
    if name == "generation":
        return (f"{r['params'] / 1e6:.1f}M params, b{r['batch']} x {r['new_tokens']} new tokens: "
                f"{r['queries_per_s']:.1f} queries/s, {r['new_tokens_per_s']:.0f} tok/s, "
                f"mem {fmt(r['peak_mem_gib'])} GiB")
    return json.dumps(r)[:120]


def print_table(report: Report) -> None:
    m = report.meta
    print(f"\n== gpu_check {'(dry run) ' if m['dry_run'] else ''}on {m['device_name']} ==")
    print(f"python {m['python']}, torch {m['torch']} (cuda {m['torch_cuda']}), transformers {m['transformers']},"
          f" onnxruntime {m['onnxruntime']}")
    for name in SECTIONS:
        if name in report.sections:
            try:
                line = section_line(name, report.sections[name])
            except Exception as exc:  # a row with a missing key: show the raw record
                line = f"(unformatted: {exc}) {json.dumps(report.sections[name], default=str)[:150]}"
        elif name in report.errors:
            line = "ERROR " + report.errors[name][:150]
        else:
            line = "skipped: " + report.skipped.get(name, "not selected")
        print(f"{name:18} {line}")
    print(f"total wall time {report.elapsed():.1f} s" + (f"; JSON: {report.path}" if report.path else ""))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON file, rewritten after every section")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes; runs on CPU (or GPU) in < 60 s")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run just these sections (matmul_peak always runs)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip sections not started by then")
    ap.add_argument("--ablation", nargs="+", choices=list(ABLATION),
                    help="run just these train_ablation variants (default on a GPU: all but "
                    + ", ".join(SLOW_COMPILE) + ")")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # the only heavy import before the CUDA check: it is what answers it

    if not torch.cuda.is_available() and not args.dry_run:
        print(NO_CUDA, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no internet
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # a CPU dry run is a code check: one thread stays quick on a shared, oversubscribed machine
        # (several threads spin-wait on each other there and made it 2-3x slower)
        torch.set_num_threads(1)
    sizes = DRY if args.dry_run else FULL
    report = Report(args.out, environment(device, args.dry_run, sizes))
    m = report.meta
    print(f"gpu_check on {m['device_name']}: torch {m['torch']}, transformers {m['transformers']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Ctx(device, sizes, small_tokenizer(Path(tmp) / "tokenizer"), m["ort_providers"], args.dry_run)
        steps: dict[str, Callable[[], dict]] = {
            "matmul_peak": lambda: matmul_peak(ctx), "train_eager": lambda: train(ctx, compiled=False),
            "evaluation": lambda: evaluation(ctx), "inference_torch": lambda: inference_torch(ctx),
            "inference_onnx": lambda: inference_onnx(ctx), "generation": lambda: generation(ctx),
            "train_compiled": lambda: train(ctx, compiled=True),
            "train_ablation": lambda: ablation(ctx, args.ablation, lambda: args.budget_s - report.elapsed()),
            "train_profile": lambda: profile(ctx),
            "matmul_peak_after": lambda: matmul_peak(ctx),
        }
        for name in SECTIONS:
            if args.only and name not in args.only and name != "matmul_peak":
                continue
            report.run(name, steps[name], args.budget_s)
    report.save()
    print_table(report)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
