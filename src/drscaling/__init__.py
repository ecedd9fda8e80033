"""drscaling: measure scaling laws of dense retrieval and turn them into decisions."""

import os

__version__ = "0.1.0"

# MKL's conditional numerical reproducibility: its AVX2 code branch on every CPU. Training on a CPU is
# bitwise repeatable on one machine, but MKL picks its GEMM code by CPU (AVX-512 on an Intel Xeon, other
# code on an AMD EPYC), so the sweeps' outputs, and dvc.lock's hashes, differed by CPU maker. With the
# branch pinned, a fresh clone's `make run` gives the committed hashes (BENCHMARKS.md "The default
# pipeline"). MKL reads this at its first call, which no import makes; a user's own MKL_CBWR (e.g. AUTO,
# for speed) is left as it is.
os.environ.setdefault("MKL_CBWR", "AVX2")
