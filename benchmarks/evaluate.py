"""Contrastive-entropy evaluation throughput, against a naive per-query implementation.

Ours encodes every distinct passage of the test corpus once and gathers the 256 negatives of all R
draws from one score matrix. The naive evaluator does what the definition reads like: for each
query and draw, encode the positive and its 256 negatives and take the softmax. The naive one is
timed on a subset of queries (it is ~257x more encoding) and scaled per query; both run in the same
process on the same model.

    .venv/bin/python benchmarks/evaluate.py [--prepared artifacts/prepared] [--naive-queries 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from drscaling.data import load_split
from drscaling.evaluate import EvalConfig, build_evalset, contrastive_entropy
from drscaling.model.build import build_model
from drscaling.model.retriever import Retriever, Tower, encode
from drscaling.model.tokenizer import load_tokenizer


def naive_ce(encoder, tok, es, cfg: EvalConfig, queries: int) -> float:
    losses = []
    for i in range(queries):
        q = encode(encoder, tok, [es.queries[i]], cfg.max_query_len, cfg.batch_size)
        for r in range(cfg.draws):
            texts = [es.passages[es.positive[i]]] + [es.passages[j] for j in es.negatives[r, i]]
            p = encode(encoder, tok, texts, cfg.max_passage_len, cfg.batch_size)
            s = (q @ p.T)[0]
            losses.append(float(np.log(np.exp(s - s.max()).sum()) + s.max() - s[0]))
    return float(np.mean(losses))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default="artifacts/prepared")
    ap.add_argument("--tokenizer", default="artifacts/tokenizer")
    ap.add_argument("--shape", default="bert-L2-H128")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--naive-queries", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = EvalConfig(draws=args.draws, max_query_len=32, max_passage_len=128)
    tok = load_tokenizer(args.tokenizer)
    enc, meta = build_model(args.shape, tok)
    retriever = Retriever.single(Tower(enc, tok, meta))
    es = build_evalset(load_split(args.prepared, "test"), "test", cfg)
    torch.manual_seed(0)

    ours = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ce = contrastive_entropy(retriever, es, cfg)
        ours.append(time.perf_counter() - t)
    t = time.perf_counter()
    naive_value = naive_ce(enc, tok, es, cfg, args.naive_queries)
    naive_per_query = (time.perf_counter() - t) / args.naive_queries

    ours_s = statistics.median(ours)
    naive_total = naive_per_query * es.n_pairs
    print(f"{args.shape}, {es.n_pairs} test queries, {len(es.passages)} distinct passages, {args.draws} draws x 256 negatives")
    print(f"ours : {ours_s:.2f} s per evaluation (median of {args.repeats}); {(len(es.passages) + es.n_pairs) / ours_s:.0f} texts encoded/s; CE {ce:.4f}")
    print(f"naive: {naive_per_query:.2f} s per query (measured on {args.naive_queries}) -> {naive_total:.0f} s for {es.n_pairs}")
    print(f"speed-up: {naive_total / ours_s:.0f}x")
    # the two implementations agree on the queries both scored (same negatives)
    p = encode(enc, tok, es.passages, cfg.max_passage_len)
    q = encode(enc, tok, es.queries[: args.naive_queries], cfg.max_query_len)
    from drscaling.evaluate import contrastive_entropy_from_scores

    ours_subset = contrastive_entropy_from_scores(q @ p.T, es.positive[: args.naive_queries], es.negatives[:, : args.naive_queries])
    print(f"agreement on the naive subset: ours {ours_subset:.5f} vs naive {naive_value:.5f}")


if __name__ == "__main__":
    main()
