"""Per-point scheduling overhead of `--executor ray` against the local executor, on a tiny grid
(default) or on points of a real preset (`--preset quick`: its training settings, the shapes and
train_pairs given; one point at a time needs `--num-cpus` = the head's CPUs, so that a point's torch uses
every core as the local executor's does).

Start a tracking server and a one-CPU Ray head first (one point at a time, like the local executor):
    mlflow server --host 127.0.0.1 --port 5055 --backend-store-uri sqlite:////tmp/bench.db \
        --default-artifact-root /tmp/bench-art &
    PYTHONPATH=src ray start --head --port 6399 --num-cpus 1 --include-dashboard=false
    MLFLOW_TRACKING_URI=http://127.0.0.1:5055 PYTHONPATH=src .venv/bin/python benchmarks/ray_overhead.py \
        --ray-address 127.0.0.1:6399 [--repeats 3] [--prepared ... --annotations ... --tokenizer ...]

Each repeat trains the grid afresh (a new seed: new config keys) through each executor into the same
server; overhead per point = (ray wall - local wall) / points. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from drscaling.executors import RayConfig
from drscaling.sweep import Preset, load_preset, run_sweep
from drscaling.train.config import Paths

TINY = {"steps": 8, "batch_size": 8, "negatives": 16, "max_query_len": 16, "max_passage_len": 24, "lr": 0.001,
        "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8, "dim": 32,
        "eval": {"negatives": 64, "draws": 2, "max_query_len": 16, "max_passage_len": 24, "rank_pool": 400}}


def wall(preset: Preset, paths: Paths, executor: str, ray: RayConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        run_sweep(preset, paths, {}, Path(out), "joint", executor=executor, ray=ray)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray-address", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prepared", default="artifacts/prepared")
    ap.add_argument("--annotations", default="artifacts/annotations")
    ap.add_argument("--tokenizer", default="artifacts/tokenizer")
    ap.add_argument("--shapes", nargs="+", default=["bert-L2-H128", "bert-L4-H128"])
    ap.add_argument("--train-pairs", nargs="+", type=int, default=[50, 100])
    ap.add_argument("--preset", default="", help="train as this preset's points do (default: tiny runs)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per point on Ray")
    args = ap.parse_args()
    train = load_preset(args.preset).train if args.preset else TINY
    ray = RayConfig(address=args.ray_address, num_cpus=args.num_cpus)
    paths = Paths(Path(args.prepared), Path(args.annotations), Path(args.tokenizer), Path("unused"))
    grid = {"shapes": args.shapes, "train_pairs": args.train_pairs}
    points = len(grid["shapes"]) * len(grid["train_pairs"])
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for rep in range(args.repeats):
        for executor in ("local", "ray"):  # a seed per (repeat, executor): each trains every point
            seed = 1000 + 2 * rep + (executor == "ray")
            preset = Preset(f"bench-{executor}-{rep}", train=train | {"seed": seed}, joint=grid)
            times[executor].append(wall(preset, paths, executor, ray))
    local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
    print(json.dumps({"preset": args.preset or "tiny", "num_cpus": args.num_cpus, "grid": grid, "points": points, "repeats": args.repeats, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3], "local_s": times["local"], "ray_s": times["ray"],
                      "median_local_s": local, "median_ray_s": ray, "ratio": ray / local,
                      "overhead_per_point_s": (ray - local) / points}, indent=2))


if __name__ == "__main__":
    main()
