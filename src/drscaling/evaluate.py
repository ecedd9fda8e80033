"""Contrastive entropy (paper eq. 5) and ranking metrics, for any saved model on any canonical dataset.

Contrastive entropy: for every (query, positive) pair of a split, -log softmax of the positive's score
among itself and K negatives drawn (fixed seed) from a negative pool, averaged over R draws. The pool is
the split's corpus minus the query's relevant passages (`negative_pool` 0, the default), or
`negative_pool` random passages of the corpus that no query of the split is judged relevant to (the
paper: 1,000,000 of MS MARCO's 8.8M). The pool and the positives are encoded once per evaluation, in
chunks, streamed to a scratch file when large; each chunk of pairs then scores only the passages it
draws, so the cost grows with the pool plus pairs x R x K, never with queries x corpus.

The split's corpus is read lean (data.Corpus): pids in memory, texts read from corpus.jsonl only for
the passages an evaluation encodes, chunk by chunk, so MS MARCO's 8.8M passages never become Python strings.

Ranking metrics: exact inner-product search over a sub-corpus (all positives of the split plus random
passages of the whole dataset up to `rank_pool`), top 1000 per query in chunks of queries (numpy's
scores up to FAISS_FROM passages, FAISS's exact brute-force search above); MRR@10,
NDCG@10, Recall@100, Recall@1000 computed by ir-measures (trec_eval's definitions, graded gains for
nDCG where the qrels carry grades).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from drscaling.data import SPLITS, Split, as_corpus, load_split
from drscaling.design import EVAL_NEGATIVES
from drscaling.errors import DrscalingError
from drscaling.model.retriever import Retriever
from drscaling.vector_index import knn_ip, top_k

EncodeFn = Callable[[list[str], int], np.ndarray]  # (texts, max_len) -> float32 [n, dim]


@dataclass
class EvalConfig:
    negatives: int = EVAL_NEGATIVES
    draws: int = 10
    seed: int = 1234
    max_query_len: int = 32
    max_passage_len: int = 180
    batch_size: int = 128
    rank_pool: int = 100_000  # sub-corpus size for ranking metrics (0: skip them)
    # CE negatives come from this many random non-relevant passages of the split's corpus (the paper:
    # 1,000,000); 0: the whole corpus. Not part of a run's config key while 0 (TrainConfig.key).
    negative_pool: int = 0


# Passages encoded per encode call: above this many, embeddings go to a scratch file chunk by chunk.
ENCODE_CHUNK = 65_536
# Bytes of gathered passage embeddings one chunk of pairs may score against (bounds CE's memory).
SCORE_BYTES = 64 << 20


@dataclass
class EvalSet:
    """Everything about a split that does not depend on the model, built once per training run."""

    name: str
    queries: list[str]  # one entry per (query, positive) pair
    passages: Sequence[str]  # distinct passages (read from the corpus file when sliced: data.Texts)
    positive: np.ndarray  # [n_pairs] index into passages
    negatives: np.ndarray  # [draws, n_pairs, K] indices into passages, never a relevant one
    qids: list[str] = dataclasses.field(default_factory=list)  # per pair, for reusing embeddings
    pids: list[str] = dataclasses.field(default_factory=list)  # per passage

    @property
    def n_pairs(self) -> int:
        return len(self.queries)


def build_evalset(split: Split, name: str, cfg: EvalConfig) -> EvalSet:
    corpus = as_corpus(split.corpus)
    pairs = split.qrels.merge(split.queries.rename(columns={"text": "query"}), on="qid", how="left")
    positive = corpus.index_of(pairs["pid"])
    if (positive < 0).any() or pairs["query"].isna().any():
        raise DrscalingError(f"{name}: qrels point at unknown queries or passages (run `drscaling validate`)")
    relevant: dict[str, set[int]] = {}
    for qid, i in zip(pairs["qid"], positive.tolist(), strict=True):
        relevant.setdefault(qid, set()).add(i)
    rng = np.random.default_rng(cfg.seed)
    if cfg.negative_pool:
        members, negs = _pooled_negatives(len(corpus), relevant, positive, len(pairs), name, cfg, rng)
        positive = np.searchsorted(members[cfg.negative_pool:], positive) + cfg.negative_pool
    else:
        members, negs = None, _corpus_negatives(len(corpus), relevant, list(pairs["qid"]), name, cfg, rng)
    # Texts are read when encoded, a chunk at a time: a pool of 1M is not 1M Python strings at once.
    return EvalSet(name=name, queries=list(pairs["query"]), passages=corpus.view(members), positive=positive,
                   negatives=negs, qids=list(pairs["qid"]), pids=corpus.pid_list(members))


def _corpus_negatives(n_corpus: int, relevant: dict[str, set[int]], qids: list[str], name: str,
                      cfg: EvalConfig, rng: np.random.Generator) -> np.ndarray:
    """[draws, pairs, K] corpus indices: each pair's negatives from the corpus minus its query's relevant passages."""
    worst = max(len(r) for r in relevant.values())
    if n_corpus - worst < cfg.negatives:
        raise DrscalingError(
            f"{name}: the corpus has {n_corpus} passages, too few for {cfg.negatives} negatives"
            f" (need at least {cfg.negatives + worst}); lower `negatives` or use a larger split"
        )
    negs = np.empty((cfg.draws, len(qids), cfg.negatives), dtype=np.int64)
    for i, qid in enumerate(qids):
        rel = relevant[qid]
        for r in range(cfg.draws):
            # Oversample by the number of relevant passages, then drop them: exact, and rarely loops.
            cand = rng.choice(n_corpus, size=cfg.negatives + len(rel), replace=False)
            negs[r, i] = [c for c in cand if c not in rel][: cfg.negatives]
    return negs


def _pooled_negatives(n_corpus: int, relevant: dict[str, set[int]], positive: np.ndarray, n_pairs: int,
                      name: str, cfg: EvalConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(members, negatives): the corpus indices to encode (the pool's `negative_pool` passages, then
    the distinct positives) and [draws, pairs, K] indices into members' pool part. The pool holds no
    passage any query of the split is judged relevant to, so no draw has to skip one."""
    judged = np.array(sorted(set().union(*relevant.values())))
    free = n_corpus - len(judged)
    size = cfg.negative_pool
    if size < 0:
        raise DrscalingError(f"negative_pool must be >= 0 (0: the whole corpus; got {size})")
    if size > free:
        raise DrscalingError(
            f"{name}: negative_pool {size} is larger than the corpus: it has {n_corpus} passages, {free} of"
            f" them judged relevant to no query; lower `negative_pool` (0 uses the whole corpus)")
    if size < cfg.negatives:
        raise DrscalingError(f"{name}: negative_pool {size} is smaller than `negatives` ({cfg.negatives})")
    # Sorted: the pool keeps corpus order, so reading its texts and embeddings walks forward.
    pool = np.setdiff1d(np.arange(n_corpus), judged)[np.sort(rng.choice(free, size=size, replace=False))]
    members = np.concatenate([pool, np.unique(positive)])
    dtype = np.int32 if size < 2**31 else np.int64
    negs = np.empty((cfg.draws, n_pairs, cfg.negatives), dtype=dtype)
    for i in range(n_pairs):
        for r in range(cfg.draws):
            negs[r, i] = rng.choice(size, size=cfg.negatives, replace=False)
    return members, negs


_EVALSETS: dict[tuple, EvalSet] = {}


def cached_evalset(prepared: str | Path, split: str, cfg: EvalConfig) -> EvalSet:
    """build_evalset, memoised per process: every run of a sweep evaluates on the same sets."""
    folder = Path(prepared) / split
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(folder.glob("*")))
    key = (str(Path(prepared).resolve()), split, json.dumps(dataclasses.asdict(cfg), sort_keys=True), stamp)
    if key not in _EVALSETS:  # one set per split of one dataset: a run alternates dev and test
        for old in [k for k in _EVALSETS if k[0] != key[0] or k[1] == split]:
            del _EVALSETS[old]
        _EVALSETS[key] = build_evalset(load_split(prepared, split, lean=True), split, cfg)
    return _EVALSETS[key]


def pair_losses(scores: np.ndarray, positive: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """scores: [n_pairs, n_passages]. Each pair's -log softmax(positive | negatives), mean over draws."""
    rows = np.arange(len(positive))
    pos = scores[rows, positive]  # [n]
    neg = scores[rows[None, :, None], negatives]  # [draws, n, K]
    logits = np.concatenate([np.broadcast_to(pos[None, :, None], neg.shape[:2] + (1,)), neg], axis=2)
    m = logits.max(axis=2, keepdims=True)
    logz = m[..., 0] + np.log(np.exp(logits - m).sum(axis=2))
    return (logz - pos[None, :]).mean(axis=0)


def contrastive_entropy_from_scores(scores: np.ndarray, positive: np.ndarray, negatives: np.ndarray) -> float:
    """Mean over draws and pairs of -log softmax(positive | negatives), from the full score matrix."""
    return float(pair_losses(scores, positive, negatives).mean())


def bootstrap_interval(values: np.ndarray, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling the test pairs)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def chunked_pair_losses(queries: np.ndarray, passages: np.ndarray, positive: np.ndarray,
                        negatives: np.ndarray) -> np.ndarray:
    """pair_losses without the [pairs, passages] score matrix: each chunk of pairs scores only the
    passages it draws (`passages` may be a memmap), at most SCORE_BYTES of them at a time."""
    n, per_pair = len(positive), negatives.shape[0] * negatives.shape[2] + 1
    step = max(1, SCORE_BYTES // (4 * passages.shape[1] * min(len(passages), per_pair)))
    out = np.empty(n, dtype=np.result_type(queries.dtype, passages.dtype))
    for s in range(0, n, step):
        e = min(n, s + step)
        cols, local = np.unique(np.concatenate([positive[s:e], negatives[:, s:e].ravel()]), return_inverse=True)
        scores = queries[s:e] @ np.asarray(passages[cols]).T  # [chunk, distinct passages drawn]
        out[s:e] = pair_losses(scores, local[: e - s], local[e - s :].reshape(negatives.shape[0], e - s, -1))
    return out


@dataclass
class Embedded:
    """The embeddings one retriever gave an evaluation set: reused by the ranking metrics."""

    queries: np.ndarray  # [n_pairs, dim], in EvalSet.queries order
    passages: np.ndarray  # [n_passages, dim], in EvalSet.passages order (a memmap when large)
    es: EvalSet

    def losses(self) -> np.ndarray:
        """Each pair's -log softmax(positive | negatives), mean over draws."""
        return chunked_pair_losses(self.queries, self.passages, self.es.positive, self.es.negatives)

    def ce(self) -> float:
        return float(self.losses().mean())

    def ce_interval(self, level: float = 0.95) -> tuple[float, float]:
        """The CE's bootstrap interval over the test pairs (how much another test sample would move it)."""
        return bootstrap_interval(self.losses(), level)

    def for_ranking(self, pids: Set[str]) -> Embedded:
        """The queries and a copy of the passages among `pids`, for rank_split to reuse, with no pairs
        (no CE): a 1M-passage CE pool's embeddings (2.9 GiB at dim 768) can go before ranking encodes more."""
        rows = [i for i, pid in enumerate(self.es.pids) if pid in pids]
        es = dataclasses.replace(self.es, passages=[], positive=np.empty(0, dtype=np.int64),
                                 negatives=np.empty((0, 0, 0), dtype=np.int64), pids=[self.es.pids[i] for i in rows])
        return Embedded(self.queries, np.array(self.passages[rows]), es)


def embed_evalset(encode_query: EncodeFn, encode_passage: EncodeFn, es: EvalSet, cfg: EvalConfig) -> Embedded:
    """Each distinct passage and each query once, with any pair of encode functions (PyTorch
    towers, onnxruntime sessions, a Triton client)."""
    p = encode_chunked(encode_passage, es.passages, cfg.max_passage_len)
    q = encode_query(es.queries, cfg.max_query_len)
    return Embedded(q, p, es)


def encode_chunked(encode: EncodeFn, texts: Sequence[str], max_len: int) -> np.ndarray:
    """encode(texts) in one call up to ENCODE_CHUNK texts; above, chunk by chunk into a scratch file
    that is unlinked at once (the mapping keeps it; the OS reclaims it when the array goes). A slice
    of `texts` is a list (a data.Texts reads only that slice's passages)."""
    if len(texts) <= ENCODE_CHUNK:
        return encode(texts[0 : len(texts)], max_len)
    out: np.ndarray | None = None
    for start in range(0, len(texts), ENCODE_CHUNK):
        part = encode(texts[start : start + ENCODE_CHUNK], max_len)
        if out is None:
            out = _scratch_array((len(texts), part.shape[1]))
        out[start : start + len(part)] = part
        del part
        _release_heap()
    return out


def _release_heap() -> None:
    """Give the heap a chunk's encoding freed back to the OS: glibc keeps the tokenizer's and torch's
    freed buffers, which added ~0.7 GiB to a 100k-passage evaluation's peak (BENCHMARKS.md)."""
    libc = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if libc:
        getattr(ctypes.CDLL(libc), "malloc_trim", lambda _pad: 0)(0)


def _scratch_array(shape: tuple[int, int]) -> np.ndarray:
    """A float32 array backed by an anonymous file in the temp folder (TMPDIR), not by memory."""
    with tempfile.NamedTemporaryFile(prefix="drscaling-embeddings-", suffix=".f32") as f:
        arr = np.memmap(f.name, dtype=np.float32, mode="w+", shape=shape)
    return arr  # the file is unlinked: nothing is left behind, even if this process is killed


def encode_fns(retriever: Retriever, cfg: EvalConfig, device: str = "cpu") -> tuple[EncodeFn, EncodeFn]:
    def q(texts: list[str], max_len: int) -> np.ndarray:
        return retriever.query.encode(texts, max_len, cfg.batch_size, device)

    def p(texts: list[str], max_len: int) -> np.ndarray:
        return retriever.passage.encode(texts, max_len, cfg.batch_size, device)

    return q, p


def contrastive_entropy(retriever: Retriever, es: EvalSet, cfg: EvalConfig, device: str = "cpu") -> float:
    return embed_evalset(*encode_fns(retriever, cfg, device), es, cfg).ce()


# ---------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------


def rank_pool(prepared: str | Path, split: Split, size: int, seed: int) -> pd.DataFrame:
    """The split's corpus plus random passages from the other splits, up to `size` passages; from a
    corpus larger than that (MS MARCO gives every split all 8.8M), its judged passages plus random
    others up to `size`, in corpus order."""
    corpus = as_corpus(split.corpus)
    if size == len(corpus):
        return split.corpus if isinstance(split.corpus, pd.DataFrame) else corpus.frame()
    if size < len(corpus):
        keep = corpus.contains(split.qrels["pid"].unique())
        free = np.flatnonzero(~keep)
        # What pandas' DataFrame.sample(n, random_state=seed) over the unjudged rows draws (it drew
        # this pool before the corpus was read lean): the same passages.
        n = max(0, size - int(keep.sum()))
        keep[free[np.random.RandomState(seed).choice(len(free), size=n, replace=False)]] = True
        return corpus.frame(np.flatnonzero(keep))
    pool = corpus.frame() if not isinstance(split.corpus, pd.DataFrame) else split.corpus
    others = pd.concat(
        [load_split(prepared, s).corpus for s in SPLITS], ignore_index=True
    ).drop_duplicates("pid")
    others = others[~others["pid"].isin(set(pool["pid"]))]
    extra = others.sample(n=min(size - len(pool), len(others)), random_state=seed)
    return pd.concat([pool, extra], ignore_index=True)


# The deepest cutoff measured (Recall@1000): each query's ranking is cut there.
RANK_DEPTH = 1000
RANK_BYTES = 256 << 20  # the score matrix of a chunk of queries and what ranking it takes
# Metric name (as logged) -> ir-measures measure. ir-measures picks trec_eval (pytrec_eval) for nDCG
# and recall, and MS MARCO's official script for RR@10: trec_eval's recip_rank has no cutoff.
MEASURES = {"mrr@10": "RR@10", "ndcg@10": "nDCG@10", "recall@100": "R@100", "recall@1000": "R@1000"}
Relevant = Set[int] | Mapping[int, int]  # relevant passage indices (binary), or index -> grade (> 0)


# From this many passages, ranking searches with FAISS (vector_index.knn_ip): 1.7x numpy's speed at
# 100k passages, slower below ~30k. Smaller pools (the embedded data's whole corpus is 34k) keep numpy's
# scores, so their rankings stay bit for bit what they were (FAISS's sums differ in the last bits).
FAISS_FROM = 65_536


def rank_top(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
    """Each query's top RANK_DEPTH passages, best first, equal scores lower index first."""
    if len(passages) >= FAISS_FROM:
        return knn_ip(queries, passages, RANK_DEPTH)
    return top_k(queries @ passages.T, RANK_DEPTH)


def ranked_metrics(ranked: np.ndarray, relevant: Sequence[Relevant]) -> dict[str, float]:
    """Mean MEASURES over queries, by ir-measures. ranked[i]: query i's passage indices, best first;
    relevant[i]: a set (grade 1 each) or {index: grade}; nDCG uses the grades as gains, like trec_eval."""
    import ir_measures  # here: importing it takes ~1 s, which every other command would pay

    if len(ranked) != len(relevant):
        raise DrscalingError(f"{len(ranked)} rankings but {len(relevant)} relevance sets")
    if any(not rel for rel in relevant):
        raise DrscalingError("every ranked query needs at least one relevant passage")
    qrels = {str(i): ({str(d): int(g) for d, g in rel.items()} if isinstance(rel, Mapping)
                      else {str(d): 1 for d in rel}) for i, rel in enumerate(relevant)}
    # Scores by rank, not raw: the evaluators re-sort by score, and breaking ties by docno (as
    # trec_eval does) would rank by index strings instead of by this ranking.
    by_rank = [float(ranked.shape[1] - r) for r in range(ranked.shape[1])]
    run = {str(i): dict(zip(map(str, row.tolist()), by_rank, strict=True)) for i, row in enumerate(ranked)}
    sums = dict.fromkeys(MEASURES, 0.0)
    names = {ir_measures.parse_measure(m): name for name, m in MEASURES.items()}
    for value in ir_measures.evaluator(list(names), qrels).iter_calc(run):
        sums[names[value.measure]] += value.value
    return {name: total / len(relevant) for name, total in sums.items()}


def ranking_metrics(scores: np.ndarray, relevant: Sequence[Relevant]) -> dict[str, float]:
    """scores: [n_queries, n_passages]; relevant[i]: the passages relevant to query i, a set of
    indices (binary relevance) or {index: grade}. Exact top-RANK_DEPTH retrieval, then MEASURES."""
    return ranked_metrics(top_k(scores, RANK_DEPTH), relevant)


def rank_split(
    retriever: Retriever, prepared: str | Path, split: Split, cfg: EvalConfig, device: str = "cpu",
    known: Embedded | None = None, passage_cache: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Ranking metrics over the split's rank pool. `known`: embeddings this retriever already gave
    the split's evaluation set; only the passages and queries they lack are encoded.
    `passage_cache` (pid -> embedding) is read and filled, for retrievers sharing a passage tower."""
    pool = rank_pool(prepared, split, cfg.rank_pool, cfg.seed)
    index = {pid: i for i, pid in enumerate(pool["pid"])}
    # Graded judgements (BEIR, ir_datasets imports; load_split(..., relevance=True)) are nDCG's gains.
    grades = split.qrels["relevance"] if "relevance" in split.qrels.columns else [1] * len(split.qrels)
    rel: dict[str, dict[int, int]] = {}
    for qid, pid, grade in zip(split.qrels["qid"], split.qrels["pid"], grades, strict=True):
        rel.setdefault(qid, {})[index[pid]] = int(grade)
    qids = list(rel)
    qtext = dict(zip(split.queries["qid"], split.queries["text"], strict=True))
    encode_q, encode_p = encode_fns(retriever, cfg, device)
    cache = passage_cache if passage_cache is not None else {}
    if known:  # only the rows this pool asks for: a 1M-passage CE pool would cost a view per row
        wanted = set(pool["pid"])
        cache.update((pid, known.passages[i]) for i, pid in enumerate(known.es.pids) if pid in wanted)
    p = _reuse(list(pool["pid"]), list(pool["text"]), cache, lambda texts: encode_p(texts, cfg.max_passage_len))
    cache.update(zip(pool["pid"], p))
    q = _reuse(qids, [qtext[x] for x in qids], known and dict(zip(known.es.qids, known.queries)),
               lambda texts: encode_q(texts, cfg.max_query_len))
    out: dict[str, list[float]] = {}
    # Chunks of queries keep the score matrix small for numpy: top_k holds ~16 bytes per score.
    step = 1024 if len(p) >= FAISS_FROM else max(1, min(1024, RANK_BYTES // (16 * len(p))))
    for start in range(0, len(qids), step):
        m = ranked_metrics(rank_top(q[start : start + step], p), [rel[x] for x in qids[start : start + step]])
        for k, v in m.items():
            out.setdefault(k, []).append(v * len(qids[start : start + step]))
    metrics = {k: float(sum(v) / len(qids)) for k, v in out.items()}
    return metrics | {"rank_pool": float(len(pool))}


def _reuse(ids: list[str], texts: list[str], known: dict[str, np.ndarray] | None,
           encode_texts: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """Embeddings for `ids`: taken from `known` where present, the rest encoded in one call."""
    known = known or {}
    missing = [i for i, x in enumerate(ids) if x not in known]
    fresh = encode_texts([texts[i] for i in missing]) if missing else None
    dim = fresh.shape[1] if fresh is not None else len(next(iter(known.values())))
    out = np.empty((len(ids), dim), dtype=np.float32)
    for i, x in enumerate(ids):
        if x in known:
            out[i] = known[x]
    if missing:
        out[missing] = fresh
    return out


# ---------------------------------------------------------------------------------------------
# The `evaluate` command: any saved model (or plain HF encoder folder) on any canonical dataset
# ---------------------------------------------------------------------------------------------


def evaluate_model(model_dir: str | Path, prepared: str | Path, split: str, cfg: EvalConfig) -> dict:
    """Any saved model (shared or dual towers), plain HF encoder folder or MLflow model URI on any canonical split."""
    from drscaling.model.encoder import check_lengths
    from drscaling.model.saved import load_retriever
    from drscaling.registry import local_model

    with local_model(model_dir) as folder:  # a folder, runs:/..., a run id or models:/name@alias
        retriever = load_retriever(folder)
    check_lengths(retriever.query.meta, cfg.max_query_len)
    check_lengths(retriever.passage.meta, cfg.max_passage_len)
    data = load_split(prepared, split, relevance=True, lean=True)
    es = build_evalset(data, split, cfg)
    if cfg.rank_pool:  # keep the rank pool, not the whole corpus (MS MARCO's is 8.8M texts), while encoding
        data = Split(rank_pool(prepared, data, cfg.rank_pool, cfg.seed), data.queries, data.qrels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    retriever.to(device)
    embedded = embed_evalset(*encode_fns(retriever, cfg, device), es, cfg)
    es = embedded.es
    metrics = {"ce": embedded.ce()}
    if cfg.rank_pool:  # rebound: the CE pool's embeddings are freed before the rank pool's are encoded
        embedded = embedded.for_ranking(set(data.corpus["pid"]))
        metrics |= rank_split(retriever, prepared, data, cfg, device, known=embedded)
    q, p = retriever.query.meta, retriever.passage.meta
    towers = {} if retriever.shared else {"query_shape": q.shape, "passage_shape": p.shape,
                                          "query_n_non_embedding": q.n_non_embedding}
    return {"model": str(model_dir), "shape": p.shape, "n_non_embedding": p.n_non_embedding, **towers,
            "split": split, "pairs": es.n_pairs, **metrics}


def ce_metric(prepared: str | Path, cfg: EvalConfig) -> Callable[..., float]:
    """Contrastive entropy on the test split for any encode(texts, max_len) function (export variants),
    or for a query and a passage encode function (dual towers)."""
    es = cached_evalset(prepared, "test", cfg)
    return lambda query_fn, passage_fn=None: embed_evalset(query_fn, passage_fn or query_fn, es, cfg).ce()


def log_evaluation(result: dict, model: str, prepared: str | Path, split: str, cfg: EvalConfig) -> None:
    """The evaluate stage's MLflow run: the model, data and settings as params, the scores as metrics,
    the split as an input dataset."""
    import mlflow

    from drscaling import registry, tracking

    with tracking.stage_run("evaluate", f"eval-{result['shape']}-{split}",
                            {"drscaling.stage": "evaluate", "shape": result["shape"]}):
        mlflow.log_params({"model": model, "data": prepared, "split": split,
                           "n_non_embedding": result["n_non_embedding"]} | {f"eval_{k}": v for k, v in vars(cfg).items()})
        mlflow.log_metrics(tracking.metric_names({k: v for k, v in result.items() if isinstance(v, float)}))
        registry.log_dataset(prepared, tracking.file_version(prepared), "evaluation", name=f"prepared/{split}")
