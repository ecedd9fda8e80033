"""One-shot GPU check for a short loan of one Hopper GPU (H100 or H200): training MFU, evaluation,
inference, generation.

Sized to run in about 4 minutes (hard internal budget: sections and ablation variants still to come are
skipped once 360 s have passed, so a compiled variant started just before ends inside 8 minutes) on a
machine that has torch and transformers but no MLflow, Triton or internet. It
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
  train_ablation      train_eager with one change at a time (gpu_train.ABLATION); --ablation picks the
                      variants, --fresh-processes runs each in a new process of this script
  train_profile       torch.profiler's top kernels over 3 eager steps

The training sections live in gpu_train.py, the sizes, context and timing helpers in gpu_common.py (this
folder; the script puts it on sys.path). To measure candidate recipes, each in its own process:

    PYTHONPATH=src python3 benchmarks/gpu_check.py --only train_ablation --fresh-processes \
        --ablation master_weights master_weights_compiled all_three_compiled --out $OUT/g.json

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
import dataclasses
import json
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

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its sibling modules, also when the script is loaded by path (tests)
    sys.path.insert(0, str(HERE))
from gpu_common import (  # noqa: E402
    DRY, FULL, SMOLLM2_135M, Ctx, Sizes, build_encoder, event_times, free_memory, peak_memory_gib, reset_memory,
    small_tokenizer, stats, use_sdpa, wall_times,
)
from gpu_train import (  # noqa: E402
    ABLATION, MFU_TARGET, SLOW_COMPILE, ablation, ablation_in_processes, default_variants, profile, train,
)

NO_CUDA = ("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
           "run with --dry-run to check the script on CPU")
BUDGET_S = 360.0  # sections not started by then are skipped: the whole loan is ~15 min, start-up included
SECTIONS = ("matmul_peak", "train_eager", "evaluation", "inference_torch", "inference_onnx",
            "generation", "train_compiled", "train_ablation", "train_profile", "matmul_peak_after")

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
        rows = [f"{k} {v['step_ms']:.1f} ms MFU {fmt(v.get('mfu'), '.1%')}" for k, v in r["variants"].items()]
        return "; ".join(rows + [f"{k} FAILED: {why[:60]}" for k, why in r.get("failed", {}).items()])
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
    ap.add_argument("--fresh-processes", action="store_true",
                    help="train_ablation: each variant in a new process of this script (steadier numbers, "
                    "+~20 s a variant for start-up)")
    return ap.parse_args(argv)


def run_ablation(ctx: Ctx, args: argparse.Namespace, time_left: Callable[[], float]) -> dict:
    if not args.fresh_processes:
        return ablation(ctx, args.ablation, time_left)
    names = args.ablation or default_variants(args.dry_run)
    return ablation_in_processes(Path(__file__).resolve(), names, args.dry_run, time_left)


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
            "train_ablation": lambda: run_ablation(ctx, args, lambda: args.budget_s - report.elapsed()),
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
