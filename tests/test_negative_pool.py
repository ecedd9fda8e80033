"""The contrastive-entropy negative pool: the default (the whole corpus) gives today's CE exactly; a
sampled pool holds only unjudged passages, is seeded, and streams its embeddings to disk when large."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from drscaling import evaluate
from drscaling.data import Split, load_split
from drscaling.errors import DrscalingError
from drscaling.evaluate import (
    EvalConfig, build_evalset, contrastive_entropy_from_scores, embed_evalset, encode_fns, pair_losses, rank_pool,
    evaluate_model, rank_split,
)
from drscaling.model.retriever import Retriever
from drscaling.model.saved import save_retriever
from conftest import random_retriever
from drscaling.train.config import TrainConfig

EVAL = EvalConfig(negatives=32, draws=3, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=0)


@pytest.fixture(scope="module")
def retriever(tokenizer_dir) -> Retriever:
    return random_retriever(tokenizer_dir, seed=5)


@pytest.fixture(scope="module")
def wide_split(prepared) -> Split:
    """The test split with 900 train passages no test query is judged relevant to added to its corpus."""
    test, train = load_split(prepared, "test"), load_split(prepared, "train")
    extra = train.corpus[~train.corpus["pid"].isin(set(test.corpus["pid"]))].head(900)
    return Split(pd.concat([test.corpus, extra], ignore_index=True), test.queries, test.qrels)


def old_negatives(split: Split, cfg: EvalConfig) -> np.ndarray:
    """The draws as the evaluation made them before the pool existed (written out again here)."""
    pairs = split.pairs()
    index = {pid: i for i, pid in enumerate(split.corpus["pid"])}
    relevant: dict[str, set[int]] = {}
    for qid, pid in zip(split.qrels["qid"], split.qrels["pid"], strict=True):
        relevant.setdefault(qid, set()).add(index[pid])
    rng = np.random.default_rng(cfg.seed)
    out = np.empty((cfg.draws, len(pairs), cfg.negatives), dtype=np.int64)
    for i, qid in enumerate(pairs["qid"]):
        for r in range(cfg.draws):
            cand = rng.choice(len(index), size=cfg.negatives + len(relevant[qid]), replace=False)
            out[r, i] = [c for c in cand if c not in relevant[qid]][: cfg.negatives]
    return out


def test_the_default_pool_gives_the_ce_of_the_full_score_matrix(wide_split, retriever):
    es = build_evalset(wide_split, "test", EVAL)
    assert list(es.passages) == list(wide_split.corpus["text"])  # the whole corpus, in corpus order
    assert (es.negatives == old_negatives(wide_split, EVAL)).all()  # the same draws as before
    emb = embed_evalset(*encode_fns(retriever, EVAL), es, EVAL)
    dense = pair_losses(emb.queries @ emb.passages.T, es.positive, es.negatives)
    assert emb.ce() == float(dense.mean())  # bit for bit: the default experiment's numbers stand
    assert emb.ce() == contrastive_entropy_from_scores(emb.queries @ emb.passages.T, es.positive, es.negatives)
    assert emb.ce_interval() == evaluate.bootstrap_interval(dense)


def test_small_score_chunks_give_the_same_losses(wide_split, retriever, monkeypatch):
    es = build_evalset(wide_split, "test", EVAL)
    emb = embed_evalset(*encode_fns(retriever, EVAL), es, EVAL)
    whole = emb.losses()
    monkeypatch.setattr(evaluate, "SCORE_BYTES", 1)  # one pair per chunk
    np.testing.assert_allclose(emb.losses(), whole, rtol=1e-5)
    np.testing.assert_allclose(whole, pair_losses(emb.queries @ emb.passages.T, es.positive, es.negatives), rtol=1e-5)


def test_a_sampled_pool_holds_only_unjudged_passages(wide_split):
    cfg = dataclasses.replace(EVAL, negative_pool=500)
    es = build_evalset(wide_split, "test", cfg)
    judged = set(wide_split.qrels["pid"])
    pool = es.pids[:500]
    assert len(set(pool)) == 500 and not judged & set(pool)
    assert es.pids[500:] == sorted(judged, key=list(wide_split.corpus["pid"]).index)  # then each positive once
    assert es.negatives.shape == (3, es.n_pairs, 32) and es.negatives.max() < 500
    text = dict(zip(wide_split.corpus["pid"], wide_split.corpus["text"], strict=True))
    assert list(es.passages) == [text[p] for p in es.pids]
    pairs = wide_split.pairs()
    assert [es.pids[i] for i in es.positive] == list(pairs["pid"])
    again = build_evalset(wide_split, "test", cfg)
    assert again.pids == es.pids and (again.negatives == es.negatives).all()  # fixed seed
    other = build_evalset(wide_split, "test", dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert other.pids != es.pids


def test_a_pool_larger_than_the_corpus_fails_before_compute(wide_split):
    free = len(wide_split.corpus) - wide_split.qrels["pid"].nunique()
    with pytest.raises(DrscalingError, match=f"negative_pool {free + 1} is larger than the corpus"):
        build_evalset(wide_split, "test", dataclasses.replace(EVAL, negative_pool=free + 1))
    build_evalset(wide_split, "test", dataclasses.replace(EVAL, negative_pool=free))  # all of it: fine
    with pytest.raises(DrscalingError, match="smaller than `negatives`"):
        build_evalset(wide_split, "test", dataclasses.replace(EVAL, negative_pool=EVAL.negatives - 1))


def test_large_pools_stream_their_embeddings_to_a_scratch_file(wide_split, retriever, monkeypatch):
    cfg = dataclasses.replace(EVAL, negative_pool=800)
    es = build_evalset(wide_split, "test", cfg)
    in_memory = embed_evalset(*encode_fns(retriever, cfg), es, cfg)
    monkeypatch.setattr(evaluate, "ENCODE_CHUNK", 128)
    streamed = embed_evalset(*encode_fns(retriever, cfg), es, cfg)
    assert isinstance(streamed.passages, np.memmap) and not isinstance(in_memory.passages, np.memmap)
    # chunks sort by length within themselves, so padding (and float rounding) may differ slightly
    np.testing.assert_allclose(streamed.passages, in_memory.passages, atol=1e-5)
    assert streamed.ce() == pytest.approx(in_memory.ce(), rel=1e-5)


def test_the_default_pool_keeps_run_keys_and_a_sampled_pool_changes_them():
    base = TrainConfig()
    assert base.eval.negative_pool == 0
    assert base.key() == "bb6394c24def"  # the key before negative_pool existed: no run retrains
    assert TrainConfig(eval=EvalConfig(negative_pool=1000)).key() != base.key()


def test_the_rank_pool_of_a_large_corpus_is_its_judged_passages_plus_a_sample(prepared, wide_split):
    pool = rank_pool(prepared, wide_split, 700, seed=4)
    judged = set(wide_split.qrels["pid"])
    assert len(pool) == 700 and judged <= set(pool["pid"]) and pool["pid"].is_unique
    order = {pid: i for i, pid in enumerate(wide_split.corpus["pid"])}
    assert list(pool["pid"]) == sorted(pool["pid"], key=order.get)  # corpus order
    assert pool.equals(rank_pool(prepared, wide_split, 700, seed=4))
    assert set(rank_pool(prepared, wide_split, 700, seed=5)["pid"]) != set(pool["pid"])
    assert rank_pool(prepared, wide_split, len(wide_split.corpus), seed=4).equals(wide_split.corpus)


def test_ranking_in_small_query_chunks_gives_the_same_metrics(prepared, wide_split, retriever, monkeypatch):
    cfg = dataclasses.replace(EVAL, rank_pool=700)
    whole = rank_split(retriever, prepared, wide_split, cfg)
    monkeypatch.setattr(evaluate, "RANK_BYTES", 16 * 700 * 7)  # 7 queries per chunk
    chunked = rank_split(retriever, prepared, wide_split, cfg)
    assert chunked == pytest.approx(whole, rel=1e-12)


def test_evaluate_model_scores_as_its_parts_do(prepared, retriever, tmp_path):
    """evaluate_model keeps only the rank pool of the corpus while encoding: the same numbers as
    the CE and the ranking computed on the whole split."""
    save_retriever(retriever, tmp_path / "model")
    cfg = dataclasses.replace(EVAL, rank_pool=700)
    got = evaluate_model(tmp_path / "model", prepared, "test", cfg)
    split = load_split(prepared, "test", relevance=True)
    es = build_evalset(split, "test", cfg)
    emb = embed_evalset(*encode_fns(retriever, cfg), es, cfg)
    assert got["ce"] == pytest.approx(emb.ce(), rel=1e-6)
    ranks = rank_split(retriever, prepared, split, cfg, known=emb)
    assert ranks["rank_pool"] == 700 and {k: got[k] for k in ranks} == pytest.approx(ranks, rel=1e-6)
    with pytest.raises(DrscalingError, match="larger than the corpus"):  # the test corpus: positives only
        evaluate_model(tmp_path / "model", prepared, "test", dataclasses.replace(cfg, negative_pool=100))
