"""Training-step throughput per shape, and model FLOP utilisation against this machine's measured peak.

MFU = 6 * N * tokens_per_step / step_seconds / peak, where N counts non-embedding parameters (so
attention-score FLOPs and the embedding update are overhead, as in Kaplan et al.) and the peak is the
median fp32 (CPU) or bf16 (CUDA) matmul throughput measured in the same run. Steps use the real
training code path: tokenised queries, positives and a shared negative pool, eq. 3 loss, AdamW.

    .venv/bin/python benchmarks/train_step.py [--shapes bert-L4-H256 bert-L8-H512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from drscaling.model.build import build_model
from drscaling.model.encoder import Towers
from drscaling.model.tokenizer import train_tokenizer
from drscaling.train.step import train_step


def matmul_peak(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 7) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rates = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(4 * 2 * size**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def step_time(shape: str, tok, batch: int, negatives: int, qlen: int, plen: int, repeats: int, device: str) -> tuple[float, int, int]:
    enc, meta = build_model(shape, tok, dim=768)
    model = Towers(enc).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = len(tok)
    g = torch.Generator().manual_seed(0)
    q = {"input_ids": torch.randint(5, vocab, (batch, qlen), generator=g), "attention_mask": torch.ones(batch, qlen, dtype=torch.long)}
    p = {"input_ids": torch.randint(5, vocab, (batch + negatives, plen), generator=g),
         "attention_mask": torch.ones(batch + negatives, plen, dtype=torch.long)}
    q = {k: v.to(device) for k, v in q.items()}
    p = {k: v.to(device) for k, v in p.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(repeats + 1):  # the first step warms up allocators and kernels
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, opt, None, q, p, batch, False, autocast, device)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    tokens = batch * qlen + (batch + negatives) * plen
    return statistics.median(times), tokens, meta.n_non_embedding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["bert-L2-H128", "bert-L4-H256", "bert-L4-H512", "bert-L8-H512"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--negatives", type=int, default=64)
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--passage-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    words = [f"w{i}" for i in range(4000)]
    tok = train_tokenizer([" ".join(words[i : i + 50]) for i in range(0, 4000, 10)], 8000, "/tmp/drscaling-bench-tok")
    peak_before = matmul_peak(device, dtype)
    rows = []
    for shape in args.shapes:
        secs, tokens, n = step_time(shape, tok, args.batch, args.negatives, args.query_len, args.passage_len, args.repeats, device)
        rows.append({"shape": shape, "n": n, "tokens_per_step": tokens, "step_s": secs,
                     "tokens_per_s": tokens / secs, "model_flops_per_s": 6 * n * tokens / secs})
    peak = statistics.median([peak_before, matmul_peak(device, dtype)])  # before and after: drift shows
    print(f"device {device} ({torch.get_num_threads()} threads); measured {dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'shape':14} {'N':>10} {'tokens/step':>11} {'step s':>8} {'tokens/s':>9} {'MFU':>6}")
    for r in rows:
        r["mfu"] = r["model_flops_per_s"] / peak
        print(f"{r['shape']:14} {r['n']:>10} {r['tokens_per_step']:>11} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['mfu']:>6.1%}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": device, "peak_flops": peak, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
