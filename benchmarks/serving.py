"""Serving and inference-speed benchmark (not a test): medians of repeats, reported as ratios.

    (a) Triton (python backend running onnxruntime) at batch 32 vs onnxruntime in-process,
        same model.onnx, same pre-tokenised batch, same onnxruntime threads  target >= 0.85x
    (b) 8 concurrent batch-1 clients vs one sequential batch-1 client
        on Triton (dynamic batching)                                    target >= 2x
    (c) optimised onnxruntime (transformer fusions, and dynamic int8) vs PyTorch eager,
        batch 32, for bert-L4-H256 and up, with the parity of each      target >= 1.3x

Ratios are taken within one run, with the two sides measured alternately in every repeat, so
drift from other processes on a shared machine hits both sides alike.

    .venv/bin/python benchmarks/serving.py                        # defaults below
    .venv/bin/python benchmarks/serving.py --repeats 7 --out /tmp/serving-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from drscaling.export import export_onnx, ort_session  # noqa: E402
from drscaling.files import write_json  # noqa: E402
from drscaling.loadgen import LoadConfig, run_load  # noqa: E402
from drscaling.model.build import build_model  # noqa: E402
from drscaling.model.saved import load_model, save_model  # noqa: E402
from drscaling.model.tokenizer import train_tokenizer  # noqa: E402
from drscaling.serving import Client, TritonServer, build_model_repository  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "data" / "debian" / "pairs.jsonl"


def texts(n: int = 3000) -> list[str]:
    out = []
    with open(SNAPSHOT, encoding="utf-8") as fh:
        for line, _ in zip(fh, range(n), strict=False):
            row = json.loads(line)
            out += [row["query"], row["passage"]]
    return out


def make_model(shape: str, tok, root: Path, variants: tuple[str, ...]) -> Path:
    """Random weights are fine: speed does not depend on training."""
    encoder, meta = build_model(shape, tok, dim=768)
    save_model(encoder, tok, meta, root / shape / "model")
    export_onnx(root / shape / "model", root / shape / "onnx", variants=variants)
    return root / shape


def batch_ids(tok, corpus: list[str], batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """A real batch padded/truncated to exactly seq_len, so every side does the same work."""
    enc = tok(corpus[:batch], max_length=seq_len, truncation=True, padding="max_length",
              return_tensors="np", return_token_type_ids=False)
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def rate(fn, rows: int, min_s: float) -> float:
    """Rows per second of fn() run back to back for at least min_s (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and n >= 3:
            return n * rows / elapsed


def bench_triton_vs_ort(server: TritonServer, model: str, onnx: Path, feeds, args) -> dict:
    # Same onnxruntime thread count as inside Triton: the ratio is then Triton's own overhead.
    session = ort_session(onnx, threads=args.server_threads)
    client = Client(server, args.protocol)
    # Serialised once, as session.run gets its numpy feeds ready-made: both sides do the same.
    send = client.prepare(model, feeds["input_ids"], feeds["attention_mask"])
    rows = feeds["input_ids"].shape[0]
    ort_rates, triton_rates = [], []
    for _ in tqdm(range(args.repeats), desc="(a) triton vs ort", leave=False):
        ort_rates.append(rate(lambda: session.run(["embedding"], feeds), rows, args.seconds))
        triton_rates.append(rate(send, rows, args.seconds))
    client.close()
    return {"batch": rows, "ort_inferences_per_s": statistics.median(ort_rates),
            "triton_inferences_per_s": statistics.median(triton_rates),
            "ratio": statistics.median(t / o for t, o in zip(triton_rates, ort_rates, strict=True)),
            "ort_all": ort_rates, "triton_all": triton_rates}


def bench_concurrency(server: TritonServer, model: str, args) -> dict:
    cfg = LoadConfig(duration_s=args.seconds, warmup_s=0.3, seq_len=args.seq_len,
                     protocol=args.protocol)
    seq, conc = [], []
    for _ in tqdm(range(args.repeats), desc="(b) 8 clients vs 1", leave=False):
        seq.append(run_load(server, model, 1, 1, cfg))
        conc.append(run_load(server, model, 1, 8, cfg))
    return {"sequential_inferences_per_s": statistics.median(c["inferences_per_s"] for c in seq),
            "concurrent8_inferences_per_s": statistics.median(c["inferences_per_s"] for c in conc),
            "ratio": statistics.median(c["inferences_per_s"] / s["inferences_per_s"]
                                       for s, c in zip(seq, conc, strict=True)),
            "sequential_p50_ms": statistics.median(c["p50_ms"] for c in seq),
            "concurrent8_p50_ms": statistics.median(c["p50_ms"] for c in conc),
            "concurrent8_p99_ms": statistics.median(c["p99_ms"] for c in conc)}


@torch.inference_mode()
def bench_ort_vs_torch(folder: Path, feeds, args) -> dict:
    encoder, _, meta = load_model(folder / "model")
    record = json.loads((folder / "onnx" / "export.json").read_text())
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    rows = feeds["input_ids"].shape[0]
    sessions = {v: ort_session(folder / "onnx" / record["variants"][v]["file"])
                for v in record["variants"]}
    rates: dict[str, list[float]] = {"torch": [], **{v: [] for v in sessions}}
    for _ in tqdm(range(args.repeats), desc=f"(c) ort vs torch {meta.shape}", leave=False):
        rates["torch"].append(rate(lambda: encoder(**tensors), rows, args.seconds))
        for v, s in sessions.items():
            rates[v].append(rate(lambda s=s: s.run(["embedding"], feeds), rows, args.seconds))
    out = {"shape": meta.shape, "n_non_embedding": meta.n_non_embedding,
           "torch_inferences_per_s": statistics.median(rates["torch"]), "variants": {}}
    for v in sessions:
        out["variants"][v] = {
            "inferences_per_s": statistics.median(rates[v]),
            "ratio_vs_torch": statistics.median(
                o / t for o, t in zip(rates[v], rates["torch"], strict=True)),
            "parity": record["variants"][v]["parity"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--serve-shape", default="bert-L2-H128", help="model for (a) and (b)")
    p.add_argument("--shapes", default="bert-L4-H256,bert-L4-H512", help="models for (c)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--server-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="onnxruntime threads inside Triton (default: cores - 1, since the load\n"
                        "generator shares this host; all cores made both (a) and (b) slower on 2)")
    p.add_argument("--instances", type=int, default=os.cpu_count() or 1,
                   help="Triton model instances (default: one per core, each with --server-threads\n"
                        "onnxruntime threads: one instance computes while another exchanges requests)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    corpus = texts()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                     "cpu_count": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="drscaling-bench-") as tmp:
        root = Path(tmp)
        tok = train_tokenizer(corpus, 8000, root / "tokenizer")
        feeds = batch_ids(tok, corpus, args.batch, args.seq_len)
        # (a), (b): the small model on Triton
        serve = make_model(args.serve_shape, tok, root, ("fp32",))
        build_model_repository(serve / "onnx", root / "repo", "enc", max_batch_size=64,
                               intra_op_threads=args.server_threads, instances=args.instances)
        with TritonServer(root / "repo") as server:
            results["a_triton_vs_ort"] = bench_triton_vs_ort(
                server, "enc", serve / "onnx" / "model.onnx", feeds, args)
            results["b_concurrency"] = bench_concurrency(server, "enc", args)
        # (c): optimised onnxruntime vs PyTorch eager
        results["c_ort_vs_torch"] = []
        for shape in [s for s in args.shapes.split(",") if s]:
            folder = make_model(shape, tok, root, ("fp32", "opt", "int8"))
            results["c_ort_vs_torch"].append(bench_ort_vs_torch(folder, feeds, args))
    report(results)
    if args.out:
        write_json(args.out, results)
    return results


def report(r: dict) -> None:
    a, b = r["a_triton_vs_ort"], r["b_concurrency"]
    print(f"(a) batch {a['batch']}: Triton {a['triton_inferences_per_s']:.0f}/s vs onnxruntime "
          f"in-process {a['ort_inferences_per_s']:.0f}/s -> {a['ratio']:.2f}x (target >= 0.85x)")
    print(f"(b) batch 1: 8 clients {b['concurrent8_inferences_per_s']:.0f}/s vs 1 client "
          f"{b['sequential_inferences_per_s']:.0f}/s -> {b['ratio']:.2f}x (target >= 2x)")
    for c in r["c_ort_vs_torch"]:
        print(f"(c) {c['shape']} (N={c['n_non_embedding']:,}): torch eager "
              f"{c['torch_inferences_per_s']:.0f}/s")
        for v, e in c["variants"].items():
            print(f"      onnxruntime {v:5s} {e['inferences_per_s']:7.0f}/s -> "
                  f"{e['ratio_vs_torch']:.2f}x  max|diff| {e['parity']['max_abs_diff']:.2g}  "
                  f"min cos {e['parity']['min_cosine']:.5f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
