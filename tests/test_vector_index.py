"""FAISS passage indexes: flat equals numpy's exact search, IVF/HNSW recall against it, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from drscaling import vector_index
from drscaling.errors import DrscalingError
from drscaling.vector_index import IndexConfig


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    """Unit vectors near random centres: the structure real embeddings have and IVF/HNSW rely on."""
    x = centres[rng.integers(0, len(centres), size=n)] + 0.3 * rng.normal(size=(n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_top_k(emb: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What serving.search did before FAISS: exact inner product, numpy."""
    scores = q @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_flat_equals_numpy_exact_search():
    rng = np.random.default_rng(0)
    emb, q = unit(rng, 3000, 48), unit(rng, 40, 48)
    for batch in (q[:1], q):  # one query (FAISS's SIMD path) and many (its BLAS path)
        scores, ids = vector_index.search(vector_index.build(emb), batch, 20)
        ref_scores, ref_ids = numpy_top_k(emb, batch, 20)
        assert (ids == ref_ids).all()
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    scores, ids = vector_index.search(vector_index.build(emb[:5]), q[:2], 10)  # k > n: all n
    assert ids.shape == (2, 5) and sorted(ids[0].tolist()) == list(range(5))


@pytest.mark.parametrize("cfg", [IndexConfig("ivf", nprobe=8), IndexConfig("hnsw", hnsw_m=16, ef_search=64)])
def test_approximate_indexes_recall_against_exact(cfg):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(64, 32))
    emb, q = clustered(rng, 5000, 32, centres), clustered(rng, 100, 32, centres)
    _, exact = vector_index.search(vector_index.build(emb), q, 10)
    _, found = vector_index.search(vector_index.build(emb, cfg), q, 10)
    r = vector_index.recall(found, exact)
    assert 0.9 <= r <= 1.0, r
    assert vector_index.recall(exact, exact) == 1.0
    assert vector_index.recall(np.full_like(exact, -1), exact) == 0.0


def test_ivf_lists_and_search_settings_survive_the_file(tmp_path):
    rng = np.random.default_rng(2)
    emb, q = unit(rng, 4000, 16), unit(rng, 30, 16)
    cfg = IndexConfig("ivf", nprobe=3)
    assert cfg.lists_for(4000) == 102 and cfg.lists_for(100) == 2 and cfg.lists_for(10) == 1  # <= n/39
    assert cfg.describe(4000) == {"type": "ivf", "nlist": 102, "nprobe": 3}
    built = vector_index.build(emb, cfg)
    vector_index.save(built, tmp_path / "x.index")
    loaded = vector_index.load(tmp_path / "x.index")
    assert loaded.nprobe == 3 and loaded.nlist == 102
    assert (vector_index.search(loaded, q, 10)[1] == vector_index.search(built, q, 10)[1]).all()
    # More lists scanned per query: never worse against exact, and all of them is exact.
    _, exact = vector_index.search(vector_index.build(emb), q, 10)
    low = vector_index.recall(vector_index.search(loaded, q, 10)[1], exact)
    vector_index.configure(loaded, nprobe=10_000)
    assert loaded.nprobe == 102 and vector_index.recall(vector_index.search(loaded, q, 10)[1], exact) == 1.0 > low
    hnsw = vector_index.build(emb, IndexConfig("hnsw", ef_search=40))
    vector_index.save(hnsw, tmp_path / "h.index")
    again = vector_index.load(tmp_path / "h.index")
    assert again.hnsw.efSearch == 40
    vector_index.configure(again, ef_search=200)
    assert again.hnsw.efSearch == 200


def test_bad_input_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(3)
    emb = unit(rng, 50, 8)
    with pytest.raises(DrscalingError, match="index type must be one of"):
        vector_index.build(emb, IndexConfig("annoy"))
    with pytest.raises(DrscalingError, match="nlist 80 exceeds the 50 passages"):
        vector_index.build(emb, IndexConfig("ivf", nlist=80))
    with pytest.raises(DrscalingError, match="ef_search must be >= 1"):
        vector_index.build(emb, IndexConfig("hnsw", ef_search=0))
    with pytest.raises(DrscalingError, match="non-empty"):
        vector_index.build(np.zeros((0, 8), np.float32))
    bad = emb.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DrscalingError, match="NaN"):
        vector_index.build(bad)
    index = vector_index.build(emb)
    with pytest.raises(DrscalingError, match="k must be >= 1"):
        vector_index.search(index, emb[:1], 0)
    with pytest.raises(DrscalingError, match="queries have 4 dimensions but the index holds 8"):
        vector_index.search(index, emb[:1, :4], 3)
    with pytest.raises(DrscalingError, match="nprobe must be >= 1"):
        vector_index.configure(index, nprobe=0)
    (tmp_path / "junk.index").write_text("not an index")
    with pytest.raises(DrscalingError, match="not a readable FAISS index"):
        vector_index.load(tmp_path / "junk.index")
    with pytest.raises(DrscalingError, match="not found"):
        vector_index.load(tmp_path / "missing.index")


def test_cli_flags_map_to_the_config():
    from drscaling.cli import build_parser

    args = build_parser().parse_args(["index", "--model", "m", "--corpus", "c", "--out", "o",
                                      "--index-type", "hnsw", "--hnsw-m", "8"])
    cfg = vector_index.config_from(**vars(args))
    assert (cfg.index_type, cfg.hnsw_m, cfg.ef_search) == ("hnsw", 8, IndexConfig().ef_search)
    args = build_parser().parse_args(["search", "--model", "m", "--index", "i", "q", "--nprobe", "4"])
    assert (args.nprobe, args.ef_search) == (4, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["index", "--model", "m", "--corpus", "c", "--out", "o", "--index-type", "lsh"])
