"""Benchmark: queries per second from the local SmolLM2-135M generator, batched vs one at a time.

Runs the real pipeline step (`generate_batch`: prompt, generate, parse, filter, pick) on the first
N passages of the train split's seeded order, once with `--batch-size` passages per generate()
call and once with one passage per call, in the same process, and reports the ratio (absolute
numbers move with machine load; the ratio much less). Optionally also times the `supervised`
format (shorter prompt) and a few fine-tuning steps, and extrapolates to `--estimate-passages`.

    .venv/bin/python benchmarks/generate.py --passages 16 --batch-size 8 --out benchmarks/generate.json

Keep it short on a shared 2-core machine: ~2-3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from drscaling.annotation import local as local_generation  # noqa: E402
from drscaling.annotation.config import FinetuneConfig, GenerationConfig  # noqa: E402
from drscaling.annotation.finetune import finetune_generator  # noqa: E402
from drscaling.annotation.local import LocalGenerator  # noqa: E402
from drscaling.annotation.resumable import _batches, by_length, generate_batch, target_passages  # noqa: E402
from drscaling.files import write_json  # noqa: E402
from drscaling.weights import DEFAULT_MODEL  # noqa: E402


def timed_generation(generator, passages, kind: str, cfg: GenerationConfig) -> dict:
    """Generate for every passage in batches of cfg.batch_size; queries kept per second."""
    generator.prompt_kind = kind
    generator.max_new_tokens = cfg.max_new_tokens
    kept = tokens_out = 0
    start = time.perf_counter()
    for batch in _batches(by_length(passages), cfg.batch_size):  # as run_generation batches
        rows = generate_batch(generator, batch, kind, cfg, "bench")
        kept += sum(1 for r in rows if not r.get("failed"))
        tokens_out += sum(r["tokens_out"] for r in rows)
    seconds = time.perf_counter() - start
    print(f"{kind} batch {cfg.batch_size}: {kept} queries in {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"prompt_kind": kind, "batch_size": cfg.batch_size, "passages": len(passages), "kept": kept,
            "tokens_out": tokens_out, "seconds": seconds, "queries_per_s": kept / seconds,
            "passages_per_s": len(passages) / seconds}


def finetune_step_seconds(prepared: str, steps: int, exclude: list[str]) -> dict:
    import tempfile

    cfg = FinetuneConfig(steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        info = finetune_generator(prepared, os.path.join(tmp, "g"), cfg, exclude)
    return {"steps": steps, "batch_size": cfg.batch_size, "max_passage_tokens": cfg.max_passage_tokens,
            "seconds": info["seconds"], "seconds_per_step": info["seconds"] / max(steps, 1),
            "default_steps": FinetuneConfig().steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepared", default="artifacts/prepared")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-single", action="store_true", help="skip the one-at-a-time run (no ratio)")
    ap.add_argument("--compare-prefix-cache", action="store_true",
                    help="also time batched generation without the few-shot prefix's KV cache")
    ap.add_argument("--supervised-format", action="store_true", help="also time the fine-tuned generator's prompt")
    ap.add_argument("--supervised-model", default=None,
                    help="a fine-tuned generator folder (artifacts/annotations/supervised-generator): time it "
                         "batched and one at a time instead of the base model with the supervised prompt")
    ap.add_argument("--finetune-steps", type=int, default=0, help="also time this many fine-tuning steps")
    ap.add_argument("--estimate-passages", type=int, default=5000)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    passages = target_passages(args.prepared, args.passages, seed=0)
    t0 = time.perf_counter()
    local = LocalGenerator.load(DEFAULT_MODEL, "llm", GenerationConfig())
    load_s = time.perf_counter() - t0
    batched_cfg = GenerationConfig(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_retries=0)
    single_cfg = GenerationConfig(batch_size=1, max_new_tokens=args.max_new_tokens, max_retries=0)
    generate_batch(local, passages.iloc[:1], "few_shot", single_cfg, "warmup")  # first call pays one-off costs

    results: dict = {"device": local.device, "python": platform.python_version(), "model": local.name,
                     "load_seconds": load_s, "cpu_count": os.cpu_count(),
                     "loadavg_start": os.getloadavg()}
    results["llm_batched"] = timed_generation(local, passages, "few_shot", batched_cfg)
    if args.compare_prefix_cache:
        cache_min = local_generation.PREFIX_CACHE_MIN_TOKENS
        local_generation.PREFIX_CACHE_MIN_TOKENS = 10**9
        results["llm_batched_no_prefix_cache"] = timed_generation(local, passages, "few_shot", batched_cfg)
        local_generation.PREFIX_CACHE_MIN_TOKENS = cache_min
        results["prefix_cache_speedup"] = (results["llm_batched"]["queries_per_s"]
                                           / results["llm_batched_no_prefix_cache"]["queries_per_s"])
    if not args.no_single:
        results["llm_single"] = timed_generation(local, passages, "few_shot", single_cfg)
        results["batched_over_single"] = results["llm_batched"]["queries_per_s"] / results["llm_single"]["queries_per_s"]
    n = args.estimate_passages
    results["estimate"] = {"passages": n, "llm_hours": n / results["llm_batched"]["passages_per_s"] / 3600}
    if args.supervised_model:
        tuned = LocalGenerator.load(args.supervised_model, "supervised", GenerationConfig())
        generate_batch(tuned, passages.iloc[:1], "passage_query", single_cfg, "warmup")
        results["supervised_batched"] = timed_generation(tuned, passages, "passage_query", batched_cfg)
        if not args.no_single:
            results["supervised_single"] = timed_generation(tuned, passages, "passage_query", single_cfg)
            results["supervised_batched_over_single"] = (results["supervised_batched"]["queries_per_s"]
                                                         / results["supervised_single"]["queries_per_s"])
    elif args.supervised_format:
        results["supervised_batched"] = timed_generation(local, passages, "passage_query", batched_cfg)
    if "supervised_batched" in results:
        results["estimate"]["supervised_generation_hours"] = n / results["supervised_batched"]["passages_per_s"] / 3600
    if args.finetune_steps:
        ft = finetune_step_seconds(args.prepared, args.finetune_steps, list(passages["pid"]))
        results["finetune"] = ft
        results["estimate"]["supervised_finetune_hours_default_steps"] = ft["seconds_per_step"] * ft["default_steps"] / 3600
    results["loadavg_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
