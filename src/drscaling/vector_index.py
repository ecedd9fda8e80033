"""Passage indexes on FAISS: exact inner product by default, IVF or HNSW for large corpora.

- "flat": faiss.IndexFlatIP, exact; its rankings equal a numpy `emb @ q` top-k (tests/test_vector_index).
- "ivf": faiss.IndexIVFFlat over inner product. k-means puts the passages into `nlist` lists; a query
  scans the `nprobe` lists whose centroids score highest. Default nlist 4*sqrt(n), FAISS's usual
  starting point, lowered so that every list trains on at least 39 passages (FAISS warns below).
- "hnsw": faiss.IndexHNSWFlat over inner product, `hnsw_m` links per node; `ef_construction` and
  `ef_search` trade build / query time for recall.
IVF and HNSW are approximate: benchmarks/faiss_search.py measures their recall@100 against flat.
The settings a query uses (nprobe, ef_search) are stored with the index and can be changed per search.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drscaling.errors import DrscalingError

INDEX_TYPES = ("flat", "ivf", "hnsw")
INDEX_FILE = "faiss.index"
MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns when a centroid has fewer training points


@dataclass
class IndexConfig:
    index_type: str = "flat"
    nlist: int = 0  # IVF lists; 0: 4*sqrt(n), at most n/39
    nprobe: int = 32  # IVF lists scanned per query
    hnsw_m: int = 32  # HNSW links per node
    ef_construction: int = 80  # HNSW candidates kept while inserting (FAISS default 40)
    ef_search: int = 128  # HNSW candidates kept while searching (>= k is needed for k results)

    def validate(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise DrscalingError(f"index type must be one of {INDEX_TYPES} (got '{self.index_type}')")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise DrscalingError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.nlist < 0:
            raise DrscalingError(f"nlist must be >= 0 (0: chosen from the corpus size; got {self.nlist})")

    def lists_for(self, n: int) -> int:
        """IVF lists for n passages: the configured number, or 4*sqrt(n) within [1, n/39]."""
        if self.nlist:
            if self.nlist > n:
                raise DrscalingError(f"nlist {self.nlist} exceeds the {n} passages: lower --nlist or use --index-type flat")
            return self.nlist
        return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))

    def describe(self, n: int) -> dict:
        """What index.json records: the type and the settings that apply to it."""
        if self.index_type == "ivf":
            return {"type": "ivf", "nlist": self.lists_for(n), "nprobe": self.nprobe}
        if self.index_type == "hnsw":
            return {"type": "hnsw", "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search}
        return {"type": "flat"}


def _faiss():
    import faiss  # here: the package is only needed by the commands that index and search

    return faiss


def _vectors(emb: np.ndarray, what: str) -> np.ndarray:
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise DrscalingError(f"{what}: expected a non-empty [n, dim] matrix, got shape {list(emb.shape)}")
    if not np.isfinite(emb).all():
        raise DrscalingError(f"{what}: holds NaN or infinite values")
    return np.ascontiguousarray(emb, dtype=np.float32)


def build(emb: np.ndarray, cfg: IndexConfig | None = None):
    """A FAISS index over the rows of `emb` (ids 0..n-1), scored by inner product."""
    faiss = _faiss()
    cfg = cfg or IndexConfig()
    cfg.validate()
    emb = _vectors(emb, "passage embeddings")
    n, dim = emb.shape
    if cfg.index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.index_type == "ivf":
        nlist = cfg.lists_for(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = min(MIN_POINTS_PER_LIST, n // nlist)  # an explicit small nlist: no warning
        index.train(emb)
    else:
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
    index.add(emb)
    configure(index, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    return index


def configure(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Search-time settings; each applies only to the index type it belongs to."""
    faiss = _faiss()
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and value < 1:
            raise DrscalingError(f"{name} must be >= 1 (got {value})")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW) and ef_search is not None:
        index.hnsw.efSearch = ef_search


def save(index, path: str | Path) -> None:
    _faiss().write_index(index, str(path))


def load(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise DrscalingError(f"{path} not found: build the index first")
    try:
        return _faiss().read_index(str(path))
    except RuntimeError as exc:
        raise DrscalingError(f"{path} is not a readable FAISS index ({str(exc).splitlines()[-1][:200]}): "
                             "rebuild it with `drscaling index`") from None


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [n_queries, k], best first. An approximate index may find fewer than k
    passages for a query: those slots hold id -1 and score -inf."""
    if k < 1:
        raise DrscalingError(f"k must be >= 1 (got {k})")
    queries = _vectors(queries, "query embeddings")
    if queries.shape[1] != index.d:
        raise DrscalingError(f"queries have {queries.shape[1]} dimensions but the index holds {index.d}")
    scores, ids = index.search(queries, min(k, index.ntotal))
    scores[ids < 0] = -np.inf
    return scores, ids


# Candidates past k that knn_ip asks FAISS for, so that equal scores at the cutoff resolve by index.
TIE_MARGIN = 64


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n_queries, k] passage indices by descending score; ties among the k go to the lower index,
    so a ranking never depends on the sort algorithm. A tie across the k-th place keeps
    argpartition's pick (deterministic, not always the lower index): kept so, as the rankings of
    the pools below evaluate.FAISS_FROM (the default pipeline's) were computed so."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top.sort(axis=1)  # index order first: the stable sort below keeps it among equal scores
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def knn_ip(queries: np.ndarray, passages: np.ndarray, k: int) -> np.ndarray:
    """[n_queries, min(k, n)] passage indices by descending inner product, ties to the lower index
    (also at the k-th place, where top_k keeps argpartition's pick), without a [queries, passages]
    score matrix: FAISS's exact brute-force search (no index, so no copy of `passages`) for
    k + TIE_MARGIN candidates, re-sorted by (-score, index). A query whose tied scores may reach past
    its candidates (duplicate passages) is sorted over all its scores. FAISS sums the inner products
    in another order than numpy's matmul: scores differ in the last bits, so near-ties may rank
    otherwise than top_k(queries @ passages.T)."""
    faiss = _faiss()
    n = len(passages)
    k, wide = min(k, n), min(n, k + TIE_MARGIN)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = faiss.knn(queries, np.ascontiguousarray(passages, dtype=np.float32), wide,
                            metric=faiss.METRIC_INNER_PRODUCT)
    order = np.lexsort((ids, -scores), axis=1)
    scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
    out = ids[:, :k].copy()
    if wide < n:
        for row in np.flatnonzero(scores[:, k - 1] == scores[:, wide - 1]):
            out[row] = np.argsort(-(np.asarray(passages) @ queries[row]), kind="stable")[:k]
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact|: an approximate top-k against the exact one."""
    hits = [len(set(f[f >= 0].tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits))


def config_from(**flags) -> IndexConfig:
    """An IndexConfig from CLI flags; None means the dataclass default."""
    names = {f.name for f in dataclasses.fields(IndexConfig)}
    return IndexConfig(**{k: v for k, v in flags.items() if k in names and v is not None})
