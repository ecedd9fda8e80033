"""Ranking metrics through ir-measures: parity with the hand-written metrics they replaced, graded
relevance as trec_eval computes it, and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import conftest
from drscaling import evaluate
from drscaling.data import Split, load_split
from drscaling.errors import DrscalingError
from drscaling.evaluate import (
    Embedded, EvalConfig, EvalSet, encode_fns, rank_pool, rank_split, ranked_metrics, ranking_metrics, top_k,
)
from drscaling.model.retriever import Retriever
from drscaling.vector_index import knn_ip

CFG = EvalConfig(negatives=16, draws=1, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=600)


def reference_metrics(scores: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """The hand-written implementation ir-measures replaced (binary relevance), kept as the reference.
    Equal scores (duplicate passage texts embed identically) rank the lower index first, as top_k
    promises: an unstable sort here made the parity depend on which duplicates sat at a cutoff."""
    k_max = min(1000, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_max]
    mrr, ndcg, r100, r1000 = [], [], [], []
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for ranked, rel in zip(order, relevant, strict=True):
        hits = np.array([d in rel for d in ranked])
        first = np.flatnonzero(hits[:10])
        mrr.append(1.0 / (first[0] + 1) if len(first) else 0.0)
        ideal = discounts[: min(len(rel), 10)].sum()
        ndcg.append(float((hits[:10] * discounts[: len(hits[:10])]).sum() / ideal))
        r100.append(hits[:100].sum() / len(rel))
        r1000.append(hits[:1000].sum() / len(rel))
    return {"mrr@10": float(np.mean(mrr)), "ndcg@10": float(np.mean(ndcg)),
            "recall@100": float(np.mean(r100)), "recall@1000": float(np.mean(r1000))}


def assert_same(new: dict[str, float], old: dict[str, float]) -> None:
    assert set(old) <= set(new)
    for name, value in old.items():
        assert new[name] == pytest.approx(value, abs=1e-6), name


def random_case(n_queries: int, n_passages: int, seed: int) -> tuple[np.ndarray, list[set[int]]]:
    """Continuous scores (no ties) and 1-15 relevant passages per query, some of them ranked high."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_queries, n_passages)).astype(np.float32)
    relevant = [set(rng.choice(n_passages, size=rng.integers(1, 16), replace=False).tolist())
                for _ in range(n_queries)]
    for i, rel in enumerate(relevant):
        for d in list(rel)[: rng.integers(0, 3)]:
            scores[i, d] += rng.uniform(1, 4)
    return scores, relevant


@pytest.mark.parametrize("n_queries,n_passages", [(120, 3000), (40, 400)])  # deeper and shallower than 1000
def test_ir_measures_equal_the_hand_written_metrics(n_queries, n_passages):
    scores, relevant = random_case(n_queries, n_passages, seed=n_passages)
    old = reference_metrics(scores, relevant)
    assert 0.05 < old["mrr@10"] < 0.95 and 0 < old["recall@100"] < old["recall@1000"] <= 1  # not a trivial case
    assert_same(ranking_metrics(scores, relevant), old)


@pytest.fixture(scope="module")
def random_retriever(tokenizer_dir) -> Retriever:
    """A random-weight encoder with the fixture data's tokenizer (duplicate passage texts still tie)."""
    return conftest.random_retriever(tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def test_split_embedded(prepared, random_retriever) -> Embedded:
    """The test split's queries and rank pool, encoded once: rank_split reuses them (`known`)."""
    split = load_split(prepared, "test")
    pool = rank_pool(prepared, split, CFG.rank_pool, CFG.seed)
    encode_q, encode_p = encode_fns(random_retriever, CFG)
    qtext = dict(zip(split.queries["qid"], split.queries["text"], strict=True))
    qids = list(qtext)
    es = EvalSet("test", [qtext[x] for x in qids], list(pool["text"]), np.empty(0), np.empty(0),
                 qids=qids, pids=list(pool["pid"]))
    return Embedded(encode_q(es.queries, CFG.max_query_len), encode_p(es.passages, CFG.max_passage_len), es)


def reference_inputs(embedded: Embedded, qrels: pd.DataFrame, graded: bool) -> tuple[np.ndarray, list]:
    """Scores of the judged queries over the pool, and their relevant passages (sets, or index -> grade)."""
    index = {pid: i for i, pid in enumerate(embedded.es.pids)}
    qids = list(dict.fromkeys(qrels["qid"]))
    rel: dict[str, dict[int, int]] = {x: {} for x in qids}
    grades = qrels["relevance"] if graded else [1] * len(qrels)
    for qid, pid, g in zip(qrels["qid"], qrels["pid"], grades, strict=True):
        rel[qid][index[pid]] = int(g)
    rows = [embedded.es.qids.index(x) for x in qids]
    scores = embedded.queries[rows] @ embedded.passages.T
    return scores, [rel[x] if graded else set(rel[x]) for x in qids]


def test_rank_split_on_the_test_split_equals_the_hand_written_metrics(prepared, random_retriever, test_split_embedded):
    split = load_split(prepared, "test", relevance=True)
    old = reference_metrics(*reference_inputs(test_split_embedded, split.qrels, graded=False))
    new = rank_split(random_retriever, prepared, split, CFG, known=test_split_embedded)
    assert new["rank_pool"] == CFG.rank_pool and split.qrels["qid"].nunique() == 300
    assert old["mrr@10"] > 0.005  # a random encoder still ranks some positives in the top 10
    assert_same(new, old)


def test_for_ranking_copies_the_wanted_rows_and_ranks_the_same(prepared, random_retriever, test_split_embedded):
    """evaluate_model hands rank_split a copy of the rank pool's rows, so the CE pool's embeddings can go."""
    full = test_split_embedded
    keep = set(full.es.pids[::2])
    slim = full.for_ranking(keep)
    rows = [i for i, pid in enumerate(full.es.pids) if pid in keep]
    assert slim.es.pids == [full.es.pids[i] for i in rows] and np.array_equal(slim.passages, full.passages[rows])
    assert not np.shares_memory(slim.passages, full.passages) and slim.queries is full.queries
    split = load_split(prepared, "test", relevance=True)
    assert_same(rank_split(random_retriever, prepared, split, CFG, known=full.for_ranking(set(full.es.pids))),
                rank_split(random_retriever, prepared, split, CFG, known=full))


def test_graded_relevance_gains_as_trec_eval():
    ranked = np.array([[1, 0, 2, 3]])  # passage 1 first, passage 0 second
    d2 = 1 / np.log2(3)
    # trec_eval's ndcg_cut: gain = grade, discount 1/log2(rank + 1), ideal = grades sorted descending.
    assert ranked_metrics(ranked, [{0: 2, 1: 1}])["ndcg@10"] == pytest.approx((1 + 2 * d2) / (2 + d2), abs=1e-12)
    assert ranked_metrics(ranked, [{0: 1, 1: 2}])["ndcg@10"] == pytest.approx(1.0, abs=1e-12)
    assert ranked_metrics(ranked, [{0, 1}])["ndcg@10"] == pytest.approx(1.0, abs=1e-12)  # binary: grade 1
    graded = ranked_metrics(ranked, [{0: 2, 3: 1}])
    assert graded["mrr@10"] == pytest.approx(1 / 2) and graded["recall@100"] == 1.0  # grade >= 1 is relevant
    assert graded["ndcg@10"] == pytest.approx((2 * d2 + 1 / np.log2(5)) / (2 + d2), abs=1e-12)


def test_rank_split_passes_the_grades_to_ndcg(prepared, random_retriever, test_split_embedded):
    split = load_split(prepared, "test", relevance=True)
    assert set(split.qrels["relevance"]) == {1}  # the Debian data has one relevant passage per query
    # A second relevant passage of grade 2 per query: graded and binary nDCG now differ.
    rng = np.random.default_rng(0)
    extra = pd.DataFrame({"qid": split.qrels["qid"], "pid": rng.choice(split.corpus["pid"], size=len(split.qrels)),
                          "relevance": 2})
    qrels = pd.concat([split.qrels, extra[extra["pid"] != split.qrels["pid"]]], ignore_index=True)
    got = rank_split(random_retriever, prepared, Split(split.corpus, split.queries, qrels), CFG, known=test_split_embedded)
    expected = ranking_metrics(*reference_inputs(test_split_embedded, qrels, graded=True))
    assert got["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-9)
    binary = rank_split(random_retriever, prepared, Split(split.corpus, split.queries, qrels[["qid", "pid"]]), CFG,
                        known=test_split_embedded)
    assert abs(got["ndcg@10"] - binary["ndcg@10"]) > 1e-4
    assert got["recall@1000"] == pytest.approx(binary["recall@1000"])  # recall ignores grades


def test_top_k_breaks_ties_by_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=np.float32)
    assert top_k(scores, 4).tolist() == [[1, 3, 0, 2]]
    assert top_k(scores, 1000).shape == (1, 5)


def test_ranking_metrics_bad_input():
    scores = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(DrscalingError, match="2 rankings but 1 relevance"):
        ranking_metrics(scores, [{0}])
    with pytest.raises(DrscalingError, match="at least one relevant passage"):
        ranking_metrics(scores, [{0}, set()])


def by_score_then_index(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("low, high, dim", [(-2, 3, 6), (-50, 51, 16)])  # most scores tie / few do
def test_faiss_top_k_ranks_ties_by_index(low, high, dim):
    """Small integer vectors: every inner product is exact in float32 whatever the summation order,
    so FAISS and numpy score alike and the rankings must be equal, ties (also at the cutoff) included."""
    rng = np.random.default_rng(dim)
    p = rng.integers(low, high, size=(3000, dim)).astype(np.float32)
    q = rng.integers(low, high, size=(40, dim)).astype(np.float32)
    for k in (1, 10, 1000):
        got = knn_ip(q, p, k)
        assert (got == by_score_then_index(q @ p.T, k)).all(), k
        # top_k agrees wherever no tie straddles its cutoff (there it keeps argpartition's pick)
        assert (np.sort(q @ p.T, axis=1)[:, ::-1][:, :k] == np.take_along_axis(q @ p.T, top_k(q @ p.T, k), 1)).all()
    assert (knn_ip(q, p[:50], 1000) == top_k(q @ p[:50].T, 1000)).all()  # a pool smaller than k: no cutoff


def test_large_rank_pools_rank_with_faiss():
    rng = np.random.default_rng(1)
    p = rng.integers(-3, 4, size=(evaluate.FAISS_FROM, 4)).astype(np.float32)
    q = rng.integers(-3, 4, size=(20, 4)).astype(np.float32)
    assert (evaluate.rank_top(q, p) == by_score_then_index(q @ p.T, evaluate.RANK_DEPTH)).all()
    assert (evaluate.rank_top(q, p[:-1]) == top_k(q @ p[:-1].T, evaluate.RANK_DEPTH)).all()  # numpy below FAISS_FROM


def test_rank_split_with_faiss_scores_close_to_numpy(prepared, random_retriever, test_split_embedded, monkeypatch):
    """On real embeddings FAISS sums in another order (last-bit differences can swap near-ties):
    the metrics agree closely, not bit for bit; pools below FAISS_FROM keep numpy's exact ones."""
    split = load_split(prepared, "test", relevance=True)
    numpy_metrics = rank_split(random_retriever, prepared, split, CFG, known=test_split_embedded)
    monkeypatch.setattr(evaluate, "FAISS_FROM", 1)
    faiss_metrics = rank_split(random_retriever, prepared, split, CFG, known=test_split_embedded)
    assert faiss_metrics == pytest.approx(numpy_metrics, abs=1e-3)
