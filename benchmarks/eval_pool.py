"""Peak memory and throughput of a full evaluation (CE over a negative pool + ranking metrics) on a
generated MS MARCO-sized collection, CPU, bert-L2-H128 from config with random weights.

The collection is generated in the canonical layout the MS MARCO importer writes for a test split
(every split holds the whole collection): `--passages` passages of 40-80 words drawn from the
embedded corpus' vocabulary, `--queries` queries with one judged passage each. The evaluation runs
in a child process (`drscaling.evaluate.evaluate_model`, what `drscaling evaluate` calls), so its
peak RSS is the evaluation's alone. Target (issue 16): peak RSS < the pool's embeddings + 2 GiB.

    nice -n 19 .venv/bin/python benchmarks/eval_pool.py --passages 2000000 --queries 7000 --pool 1000000 \\
        --work /tmp/evalpool [--rank-pool 100000] [--tokenizer artifacts/tokenizer]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GiB = 1 << 30


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def generate(dest: Path, passages: int, queries: int, vocab_from: Path, seed: int = 0) -> None:
    """A test split: `passages` generated passages, `queries` queries each judged on one of them."""
    if (dest / "test" / "qrels.jsonl").exists():
        return
    words = sorted({w for line in open(vocab_from) for w in json.loads(line)["text"].lower().split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 81, size=passages)

    def texts():
        for start in range(0, passages, 10_000):
            n = lengths[start : start + 10_000]
            ids = rng.integers(0, len(words), size=int(n.sum()))
            for i, chunk in enumerate(np.split(ids, np.cumsum(n)[:-1])):
                yield {"pid": f"p{start + i}", "text": " ".join(words[j] for j in chunk)}

    write_jsonl(dest / "test" / "corpus.jsonl", texts())
    judged = rng.choice(passages, size=queries, replace=False)
    qwords = rng.integers(0, len(words), size=(queries, 6))
    write_jsonl(dest / "test" / "queries.jsonl",
                ({"qid": f"q{i}", "text": " ".join(words[j] for j in qwords[i])} for i in range(queries)))
    write_jsonl(dest / "test" / "qrels.jsonl", ({"qid": f"q{i}", "pid": f"p{p}"} for i, p in enumerate(judged)))


def make_model(dest: Path, tokenizer: Path, dim: int) -> None:
    from drscaling.model.build import build_model
    from drscaling.model.retriever import Retriever, Tower
    from drscaling.model.saved import save_retriever
    from drscaling.model.tokenizer import load_tokenizer

    if (dest / "drscaling.json").exists():
        return
    tok = load_tokenizer(tokenizer)
    encoder, meta = build_model("bert-L2-H128", tok, dim=dim, seed=0)
    save_retriever(Retriever.single(Tower(encoder, tok, meta)), dest)


STAGES = ("load_split", "build_evalset", "rank_pool", "embed_evalset", "chunked_pair_losses", "rank_split", "_reuse")


def rss_gib() -> tuple[float, float]:
    """(current, peak) RSS of this process in GiB."""
    with open("/proc/self/status") as f:
        cur = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    return round(cur / GiB, 3), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB, 3)


def trace_stages(log: list) -> None:
    """Wrap evaluate's stages (module globals, which evaluate_model calls) to record the RSS at entry
    and exit of each: where the peak is reached. Measurement only; the results are unchanged."""
    from drscaling import evaluate

    def wrap(name, fn):
        def traced(*a, **kw):
            log.append((name, "in", *rss_gib()))
            out = fn(*a, **kw)
            log.append((name, "out", *rss_gib()))
            return out
        return traced

    for name in STAGES:
        setattr(evaluate, name, wrap(name, getattr(evaluate, name)))


def child(args: argparse.Namespace) -> None:
    """The measured evaluation: one process, nothing but evaluate_model."""
    import torch

    from drscaling.evaluate import EvalConfig, evaluate_model

    stages: list = []
    if args.trace:
        trace_stages(stages)

    torch.set_num_threads(args.threads)
    cfg = EvalConfig(negatives=256, draws=10, max_query_len=32, max_passage_len=180, batch_size=128,
                     rank_pool=args.rank_pool, negative_pool=args.pool)
    start = time.perf_counter()
    if args.load_only:  # what evaluate_model holds before it encodes anything
        from drscaling.data import Split, load_split
        from drscaling.evaluate import build_evalset, rank_pool

        data = load_split(args.work / "prepared", "test", relevance=True, lean=True)
        es = build_evalset(data, "test", cfg)
        data = Split(rank_pool(args.work / "prepared", data, cfg.rank_pool, cfg.seed), data.queries, data.qrels)
        result = {"pairs": es.n_pairs, "rank_pool": len(data.corpus), "ce": None}
    else:
        result = evaluate_model(args.work / "model", args.work / "prepared", "test", cfg)
    secs = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": secs, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "peak_rss": usage.ru_maxrss * 1024, "result": result, "stages": stages}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=2_000_000)
    ap.add_argument("--queries", type=int, default=7000)
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--rank-pool", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768, help="embedding size (params.yaml train.dim)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, required=True, help="folder for the generated data and model (reused)")
    ap.add_argument("--tokenizer", type=Path, default=Path("artifacts/tokenizer"))
    ap.add_argument("--vocab-from", type=Path, default=Path("artifacts/prepared/train/corpus.jsonl"))
    ap.add_argument("--load-only", action="store_true",
                    help="measure only loading the split and building the pools (no encoding): the memory "
                         "a full run holds besides its embeddings, at full scale in minutes")
    ap.add_argument("--trace", action="store_true",
                    help="print the RSS (current, peak GiB) at entry and exit of each evaluation stage")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    t = time.perf_counter()
    generate(args.work / "prepared", args.passages, args.queries, args.vocab_from)
    make_model(args.work / "model", args.tokenizer, args.dim)
    print(f"data and model ready in {time.perf_counter() - t:.0f} s", flush=True)
    load = [os.getloadavg()]
    cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
    run = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    load.append(os.getloadavg())
    if run.returncode:
        sys.exit(f"evaluation failed:\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    r = out["result"]
    for stage in out["stages"]:
        print("stage %-20s %-3s rss %.3f GiB, peak so far %.3f GiB" % tuple(stage))
    if args.load_only:  # no encoding: rates and the bound do not apply
        print(json.dumps({"passages": args.passages, "queries": args.queries, "pool": args.pool,
                          "rank_pool": r["rank_pool"], "seconds": round(out["seconds"], 1),
                          "peak_rss_gib": round(out["peak_rss"] / GiB, 3), "loadavg_start_end": load}))
        return
    pool_bytes = (args.pool + args.queries) * args.dim * 4  # the pool's embeddings (+ the positives')
    # Passages encoded: the CE pool, the positives, and the rank pool's random passages that the CE
    # pool lacks (rank_split reuses the rest); the last term is its expectation.
    others = r.get("rank_pool", args.queries) - args.queries
    encoded = args.pool + args.queries + others * (1 - args.pool / (args.passages - args.queries))
    print(json.dumps({
        "passages": args.passages, "queries": args.queries, "pool": args.pool, "rank_pool": args.rank_pool,
        "seconds": round(out["seconds"], 1), "passages_per_s": round(encoded / out["seconds"], 1),
        # CPU seconds (all threads; they include loading and scoring): the number comparable under load
        "cpu_seconds": round(out["cpu_seconds"], 1), "passages_per_cpu_s": round(encoded / out["cpu_seconds"], 1),
        "peak_rss_gib": round(out["peak_rss"] / GiB, 3), "pool_embeddings_gib": round(pool_bytes / GiB, 3),
        "bound_gib": round(pool_bytes / GiB + 2, 3), "within_bound": out["peak_rss"] < pool_bytes + 2 * GiB,
        "ce": r["ce"], "mrr@10": r.get("mrr@10"), "loadavg_start_end": load,
    }, indent=1))


if __name__ == "__main__":
    main()
