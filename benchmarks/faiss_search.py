"""FAISS (flat, IVF, HNSW; drscaling.vector_index) against the numpy search that serving.search did.

Random unit vectors (default dim 384, 1,000 queries, k 100) at each corpus size. For each method:
build time (once), search throughput (median of --repeats runs over all queries) in queries per
wall second and per CPU second, and recall@k against the exact top k. Two numpy baselines:
- "numpy, one query": what serving.search did before FAISS, `emb @ q` then argpartition + argsort,
  one query at a time; timed on the first --single-queries queries (it is slow) and scaled per query;
- "numpy, batched": the same exact search over query chunks (one matmul per chunk), the fair batch rival.
"faiss flat, one query" is FAISS's exact search called one query at a time, as `drscaling search` does.

Threads: --threads (default 1) for numpy's BLAS and FAISS alike, so the comparison is per core.

Uniform random vectors have no structure, the worst case for IVF and HNSW (every list and every graph
neighbourhood is equally likely to hold a true neighbour); `--clusters C` draws passages and queries
near C random centres instead, closer to what trained encoders produce.

    nice -n 19 .venv/bin/python benchmarks/faiss_search.py --passages 100000 --out benchmarks/results/faiss_100k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from drscaling import vector_index
from drscaling.vector_index import IndexConfig


def unit_vectors(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray | None) -> np.ndarray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunks: float64 temporaries stay small at 1M x 384
        m = min(100_000, n - start)
        x = rng.standard_normal((m, dim))
        if centres is not None:
            x = centres[rng.integers(0, len(centres), size=m)] + 0.5 * x / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_one(emb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """serving.search before FAISS, for one query vector."""
    scores = emb @ q
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def numpy_batched(emb: np.ndarray, queries: np.ndarray, k: int, chunk: int = 128) -> np.ndarray:
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ emb.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        ids[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return ids


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[tuple[float, float], np.ndarray]:
    """Median (wall, CPU) seconds over `repeats` runs, and the last result. CPU time (this process,
    all threads) is what the work costs; wall time also counts waiting for a core on a loaded machine."""
    wall, cpu, result = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return (statistics.median(wall), statistics.median(cpu)), result


def bench_size(n: int, args, rng: np.random.Generator, centres: np.ndarray | None) -> list[dict]:
    emb = unit_vectors(rng, n, args.dim, centres)
    queries = unit_vectors(rng, args.queries, args.dim, centres)
    k, nq, few = args.k, args.queries, min(args.single_queries, args.queries)
    rows = []

    def row(method: str, secs: tuple[float, float], queries_timed: int, found: np.ndarray,
            build_s: tuple[float, float] | None = None, **settings) -> None:
        r = vector_index.recall(found, exact[: len(found)])
        rows.append({"passages": n, "method": method, "queries_per_s": queries_timed / secs[0],
                     "queries_per_cpu_s": queries_timed / secs[1], "recall_at_k": r,
                     "build_s": build_s and build_s[0], "build_cpu_s": build_s and build_s[1], **settings})
        build = "-" if build_s is None else f"{build_s[0]:.1f} s (CPU {build_s[1]:.1f} s)"
        print(f"{n:>9,}  {method:<22} {queries_timed / secs[0]:>9.1f} q/s  {queries_timed / secs[1]:>9.1f} q/CPU-s  "
              f"recall@{k} {r:.4f}  build {build}", flush=True)

    secs, exact = timed(lambda: numpy_batched(emb, queries, k), args.repeats)
    row("numpy, batched", secs, nq, exact)
    secs, one = timed(lambda: np.stack([numpy_one(emb, q, k) for q in queries[:few]]), args.repeats)
    row("numpy, one query", secs, few, one)
    for cfg in (IndexConfig("flat"), IndexConfig("ivf", nprobe=args.nprobe),
                IndexConfig("hnsw", hnsw_m=args.hnsw_m, ef_search=args.ef_search)):
        if cfg.index_type not in args.types:
            continue
        build_s, index = timed(lambda cfg=cfg: vector_index.build(emb, cfg), 1)
        secs, (_, found) = timed(lambda index=index: vector_index.search(index, queries, k), args.repeats)
        row(f"faiss {cfg.index_type}", secs, nq, found, build_s, **cfg.describe(n))
        if cfg.index_type == "flat":
            secs, found = timed(lambda index=index: np.concatenate(
                [vector_index.search(index, q[None], k)[1] for q in queries[:few]]), args.repeats)
            row("faiss flat, one query", secs, few, found)
        del index
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--single-queries", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--types", nargs="+", default=["flat", "ivf", "hnsw"], choices=vector_index.INDEX_TYPES)
    ap.add_argument("--nprobe", type=int, default=IndexConfig.nprobe)
    ap.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    ap.add_argument("--ef-search", type=int, default=IndexConfig.ef_search)
    ap.add_argument("--clusters", type=int, default=0, help="0: uniform random unit vectors")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS and FAISS threads (0: the libraries' default). 1 by default: on a loaded machine "
                         "multi-threaded BLAS/OpenMP spin-waits for descheduled threads and times become noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the rows and the machine as JSON")
    args = ap.parse_args()
    import faiss
    from threadpoolctl import threadpool_limits

    if args.threads:
        threadpool_limits(args.threads)
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)) if args.clusters else None
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "numpy": np.__version__,
               "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(machine))
    rows = [r for n in args.passages for r in bench_size(n, args, rng, centres)]
    machine["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps({"loadavg_end": machine["loadavg_end"]}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "machine": machine, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
