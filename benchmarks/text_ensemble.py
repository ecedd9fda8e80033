"""Text-in ensemble benchmark (not a test): Triton tokenising vs the client tokenising.

    server: texts -> <name>-text (the tokenizer model, then the encoder), one request per batch
    client: texts -> tokenizer here (transformers' fast tokenizer) -> <name> (the tensor model)

Both sides send the same batch of real passages (batch 32 by default), truncated to the model's
passage length, to one server, one request at a time; the two sides alternate within every repeat
(order swapped each repeat), so drift from other processes hits both alike. Reported: texts/s per
side (median over repeats) and the median of the per-repeat ratios server/client (target >= 0.9x).
The embeddings of the two sides are checked equal first.

    .venv/bin/python benchmarks/text_ensemble.py --export artifacts/export/minilm-L2
    .venv/bin/python benchmarks/text_ensemble.py --protocol grpc --repeats 7 --out /tmp/text-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from drscaling.files import write_json  # noqa: E402
from drscaling.model.tokenizer import load_tokenizer  # noqa: E402
from drscaling.serving import Client, TritonServer, build_model_repository  # noqa: E402
from serving import rate  # noqa: E402  (benchmarks/serving.py: the same rows/s loop)

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "data" / "debian" / "pairs.jsonl"


def passages(n: int) -> list[str]:
    out = []
    with open(SNAPSHOT, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["passage"])
            if len(out) == n:
                return out
    raise SystemExit(f"{SNAPSHOT} holds fewer than {n} pairs")


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default=str(REPO / "artifacts" / "export" / "minilm-L2"),
                    help="an export folder (drscaling export): model.onnx, tokenizer/, drscaling.json")
    ap.add_argument("--batch", type=int, default=32, help="texts per request")
    ap.add_argument("--repeats", type=int, default=5, help="alternating measurements per side")
    ap.add_argument("--min-s", type=float, default=3.0, help="seconds per measurement")
    ap.add_argument("--protocol", choices=("http", "grpc"), default="http")
    ap.add_argument("--instances", type=int, default=1, help="instances of each model (encoder, tokenizer)")
    ap.add_argument("--intra-op-threads", type=int, default=0, help="onnxruntime threads (0 = all cores)")
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args()

    texts = passages(args.batch)
    with tempfile.TemporaryDirectory(prefix="text-bench-") as tmp:
        repo = Path(tmp) / "repo"
        build_model_repository(args.export, repo, "m", max_batch_size=max(64, args.batch),
                               instances=args.instances, intra_op_threads=args.intra_op_threads)
        tok = load_tokenizer(repo / "m" / "1" / "tokenizer")
        with TritonServer(repo) as server, Client(server, args.protocol) as client:
            max_len = client.info("m").max_len("passage")

            def client_side() -> np.ndarray:
                enc = tok(texts, max_length=max_len, truncation=True, padding=True, return_tensors="np",
                          return_token_type_ids=False)
                return client.infer("m", enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))

            def server_side() -> np.ndarray:
                return client.infer_text("m-text", texts, max_len)

            if not np.array_equal(client_side(), server_side()):
                raise SystemExit("the two sides' embeddings differ: fix that before timing them")
            sides = {"client": client_side, "server": server_side}
            rates: dict[str, list[float]] = {"client": [], "server": []}
            loads = [load()]
            for r in range(args.repeats):
                for name in (("client", "server") if r % 2 == 0 else ("server", "client")):
                    rates[name].append(rate(sides[name], len(texts), args.min_s))
                loads.append(load())
                print(f"repeat {r + 1}: client {rates['client'][-1]:.0f} texts/s, "
                      f"server {rates['server'][-1]:.0f} texts/s", flush=True)
    ratios = [s / c for s, c in zip(rates["server"], rates["client"], strict=True)]
    result = {
        "export": args.export, "batch": args.batch, "max_len": max_len, "protocol": args.protocol,
        "repeats": args.repeats, "min_s": args.min_s, "instances": args.instances,
        "intra_op_threads": args.intra_op_threads,
        "client_texts_per_s": statistics.median(rates["client"]),
        "server_texts_per_s": statistics.median(rates["server"]),
        "ratio_median": statistics.median(ratios), "ratios": ratios, "rates": rates,
        "loadavg_1_5_15": loads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("rates", "loadavg_1_5_15")}, indent=2))
    print(f"ensemble / client tokenisation: {result['ratio_median']:.2f}x (target >= 0.9x)")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
