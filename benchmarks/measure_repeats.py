"""Spread of repeated load settings on the tests' tiny model (bert-L2-H128, dim 32), under whatever load runs.

Usage: nice -n 19 python benchmarks/measure_repeats.py   (results: BENCHMARKS.md)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model builder

from conftest import make_tiny_export  # noqa: E402

from drscaling.costs import measure  # noqa: E402
from drscaling.serving import TritonServer, build_model_repository  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="measure-repeats-"))
repo = root / "repo"
build_model_repository(make_tiny_export(root), repo, "tiny", max_batch_size=32)
with TritonServer(repo, log_path=root / "triton.log") as server:
    t0 = time.time()
    r = measure(server, [("tiny", "bert-L2-H128", 405_000)], batch_sizes=(1, 8, 32), concurrency=(1, 8),
                duration_s=0.5, warmup_s=0.2, seq_len=64, repeats=3, log_mlflow=False)
    wall = time.time() - t0
print(json.dumps({"wall_s": round(wall, 1), "machine": r["machine"], "fit": r["inference"]["fit"],
                  "cells": [(c["batch"], c["concurrency"], round(c["tokens_per_s"]), [round(x) for x in c["per_repeat"]["tokens_per_s"]],
                             round(c["spread"]["tokens_per_s"]["rel"], 3), round(c["p50_ms"], 2), round(c["spread"]["p50_ms"]["rel"], 3))
                            for c in r["sweep"]["tiny"]], "flags": len(r["flags"])}, indent=1))
