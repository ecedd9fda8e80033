"""Passages/s of `drscaling index --executor ray` against the local executor (Triton), on one corpus.

Start a Ray head first (RAY_AUTH_MODE=disabled: else a ~/.ray/auth_token makes it demand one):
    RAY_AUTH_MODE=disabled PYTHONPATH=src ray start --head --port 6399 --num-cpus 2 --include-dashboard=false
    PYTHONPATH=src .venv/bin/python benchmarks/index_ray.py --ray-address 127.0.0.1:6399 \
        [--repo artifacts/serving/repo --model minilm-L1 --corpus artifacts/prepared/train/corpus.jsonl --n 3000]

The local executor embeds on a Triton server started once on a repository holding only --model (its
config as exported: instances, threads); the ray executor's wall time includes connecting to the cluster and
starting its actors (each loads the graph), which every `drscaling index --executor ray` pays. Both write
the full index (FAISS flat). Medians over --repeats; the two indexes' embeddings are compared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from drscaling.serving import TritonServer, build_index
from drscaling.serving.index_ray import RayIndexConfig, build_index_ray


def load() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-address", required=True)
    ap.add_argument("--repo", default="artifacts/serving/repo")
    ap.add_argument("--model", default="minilm-L1")
    ap.add_argument("--corpus", default="artifacts/prepared/train/corpus.jsonl")
    ap.add_argument("--n", type=int, default=3000, help="first N passages of --corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=0, help="ray actors (0: one per CPU of the cluster)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = tmp / "corpus.jsonl"
        with open(args.corpus, encoding="utf-8") as src:
            corpus.write_text("".join(itertools.islice(src, args.n)), encoding="utf-8")
        repo = tmp / "repo"  # the one model: Triton starts in seconds
        shutil.copytree(Path(args.repo) / args.model, repo / args.model)
        server = TritonServer(repo).start()
        times: dict[str, list[float]] = {"local": [], "ray": []}
        loads = [load()]
        try:
            for rep in range(args.repeats):
                times["local"].append(timed(lambda: build_index(server, args.model, corpus, tmp / f"local{rep}", repo=repo)))
                loads.append(load())
                cfg = RayIndexConfig(address=args.ray_address, concurrency=args.concurrency)
                times["ray"].append(timed(lambda: build_index_ray(repo, args.model, corpus, tmp / f"ray{rep}", cfg)))
                loads.append(load())
        finally:
            server.stop()
        a, b = np.load(tmp / "local0" / "embeddings.npy"), np.load(tmp / "ray0" / "embeddings.npy")
        same = all((tmp / "local0" / f).read_bytes() == (tmp / "ray0" / f).read_bytes()
                   for f in ("pids.json", "passages.jsonl", "index.json"))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": args.model, "passages": args.n, "repeats": args.repeats, "wall_s": times,
                      "passages_per_s": {k: round(args.n / v, 1) for k, v in median.items()},
                      "ray_over_local": round(median["local"] / median["ray"], 3),
                      "max_abs_diff": float(np.abs(a - b).max()), "same_pids_passages_meta": same,
                      "loadavg": loads}, indent=2))


if __name__ == "__main__":
    main()
