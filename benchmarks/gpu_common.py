"""Shared parts of benchmarks/gpu_check.py: the sizes of a full and a dry run, the run context, timing
helpers (warm up, synchronise, median of repeats) and the project's encoder built from config."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def small_tokenizer(dest: Path) -> Any:
    """A WordPiece vocabulary over synthetic words w0..w3999, as benchmarks/train_step.py makes."""
    from drscaling.model.tokenizer import train_tokenizer

    words = [f"w{i}" for i in range(4000)]
    return train_tokenizer([" ".join(words[i : i + 50]) for i in range(0, 4000, 10)], 8000, dest)
