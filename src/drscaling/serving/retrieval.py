"""Texts to embeddings on Triton, and the passage index built and searched with them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drscaling import vector_index
from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, dumps, iter_jsonl, read_jsonl
from drscaling.serving.client import Client, ModelInfo, resolve_tower, text_model
from drscaling.serving.repository import VERSION
from drscaling.serving.server import TritonServer
from drscaling.vector_index import IndexConfig


def _tokenizer_for(client: Client, model: str, tokenizer: str | Path | None, repo: str | Path | None = None):
    """The tokenizer shipped beside the model: explicit path, else from the model repository (a
    TritonServer's own, or `repo`: the folder the server was started on)."""
    from drscaling.model.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for root in (client.server.repo_dir if client.server is not None else None, repo):
        if root is not None and (Path(root) / model / VERSION / "tokenizer").is_dir():
            return load_tokenizer(Path(root) / model / VERSION / "tokenizer")
    raise DrscalingError(
        f"no tokenizer for model '{model}': pass the repository the server runs on (repo=, --repo) or "
        f"tokenizer=<repository>/{model}/{VERSION}/tokenizer; the client tokenises, and the tokenizer "
        "lives beside the model in the repository"
    )


def encode_texts(
    url: str | TritonServer, model: str, texts: Sequence[str], protocol: str = "http",
    batch_size: int = 32, max_len: int | None = None, tokenizer: str | Path | None = None,
    desc: str | None = None, role: str | None = None, repo: str | Path | None = None,
    server_tokenize: bool = False,
) -> np.ndarray:
    """Embed texts on Triton; returns float32 [len(texts), dim] in input order.

    Tokenised here with the tokenizer beside the model (`tokenizer`, or found through a
    TritonServer's repository), truncated to `max_len` (default: the model's query length for
    role="query", else its passage length). With `server_tokenize`, the texts go as they are to the
    model's <model>-text ensemble, which tokenises them in Triton the same way (same batches, same
    truncation: the same embeddings). With `role`, `model` may name a dual pair: its tower of that
    role embeds the texts (see resolve_tower).
    """
    texts = list(texts)
    if not texts:
        raise DrscalingError("encode_texts: no texts given (empty batch)")
    if not all(isinstance(t, str) for t in texts):
        raise DrscalingError("encode_texts: every text must be a string")
    if batch_size < 1:
        raise DrscalingError(f"batch_size must be >= 1 (got {batch_size})")
    with Client(url, protocol) as client:
        if role is not None:
            model = resolve_tower(client, model, role)
        info = client.info(model)
        if max_len is None:  # the role's length, within what the model's positions allow
            max_len = info.max_len(role)
        if max_len > info.max_sequence_length:
            raise DrscalingError(
                f"max_len {max_len} exceeds the {info.max_sequence_length} positions of model "
                f"'{model}'"
            )
        embed = _text_embedder(client, model, max_len) if server_tokenize else \
            _id_embedder(client, model, max_len, _tokenizer_for(client, model, tokenizer, repo))
        out = np.empty((len(texts), info.dim), dtype=np.float32)
        # Sorted by length so each batch pads little; results go back to input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
            idx = order[start : start + batch_size]
            out[idx] = embed([texts[i] for i in idx])
        return out


def _id_embedder(client: Client, model: str, max_len: int, tok):
    """texts -> embeddings, tokenised here, the tensor model embedding the ids."""
    from drscaling.export import token_feeds

    def embed(batch: list[str]) -> np.ndarray:
        feeds = token_feeds(tok, batch, max_len)
        return client.infer(model, feeds["input_ids"], feeds["attention_mask"])

    return embed


def _text_embedder(client: Client, model: str, max_len: int):
    """texts -> embeddings through the model's text ensemble (Triton tokenises)."""
    name = text_model(client, model)
    return lambda batch: client.infer_text(name, batch, max_len)


def corpus_rows(corpus_path: str | Path) -> Iterator[tuple[str, str]]:
    """(pid, text) of a JSONL corpus ({"pid", "text"} per line), streamed and checked: a duplicate pid
    or a text that is not a string is a DrscalingError naming it."""
    seen: set[str] = set()
    for row in iter_jsonl(corpus_path, required=("pid", "text")):
        pid = str(row["pid"])
        if pid in seen:
            raise DrscalingError(f"{corpus_path}: duplicate pid '{pid}'")
        if not isinstance(row["text"], str):
            raise DrscalingError(f"{corpus_path}: every 'text' must be a string")
        seen.add(pid)
        yield pid, row["text"]


def write_passages(folder: Path, rows: Iterable[tuple[str, str]]) -> list[str]:
    """An index's passages.jsonl and pids.json from (pid, text) rows, streamed; returns the pids."""
    pids = []
    with open(folder / "passages.jsonl", "w", encoding="utf-8") as fh:
        for pid, text in rows:
            fh.write(dumps({"pid": pid, "text": text}, ensure_ascii=False) + "\n")
            pids.append(pid)
    (folder / "pids.json").write_text(dumps(pids))
    return pids


def index_meta(info: ModelInfo, n: int, corpus_path: str | Path, index: IndexConfig) -> dict:
    """index.json of an index of n passages embedded by the passage model `info`."""
    # Queries must go through the same encoder (shared) or the pair's query tower.
    query_model = info.name if info.tower == "shared" else f"{info.retriever}-query"
    return {"model": info.name, "query_model": query_model, "retriever": info.retriever,
            "tower": info.tower, "n": n, "dim": info.dim, "corpus": str(Path(corpus_path).resolve()),
            "score": "inner_product", "index": index.describe(n)}


def write_search_index(folder: Path, emb: np.ndarray, index: IndexConfig, meta: dict) -> None:
    """faiss.index over `emb` (embeddings.npy's rows), then index.json: the last files of an index."""
    vector_index.save(vector_index.build(emb, index), folder / vector_index.INDEX_FILE)
    (folder / "index.json").write_text(dumps(meta, indent=2))


def build_index(
    url: str | TritonServer, model: str, corpus_path: str | Path, out_dir: str | Path,
    protocol: str = "http", batch_size: int = 32, tokenizer: str | Path | None = None,
    repo: str | Path | None = None, index: IndexConfig | None = None, server_tokenize: bool = False,
) -> dict:
    """Embed a JSONL corpus ({"pid", "text"} per line) on Triton; writes out_dir atomically:
    embeddings.npy (float32 [n, dim]), faiss.index (`index`: exact inner product by default, IVF or
    HNSW; see drscaling.vector_index), pids.json, passages.jsonl, index.json. Returns index.json.
    (drscaling.serving.index_ray builds the same files on a Ray cluster.)"""
    index = index or IndexConfig()
    index.validate()
    rows = list(corpus_rows(corpus_path))
    with Client(url, protocol) as client:
        info = client.info(resolve_tower(client, model, "passage"))
    meta = index_meta(info, len(rows), corpus_path, index)
    emb = encode_texts(url, info.name, [text for _, text in rows], protocol=protocol, batch_size=batch_size,
                       tokenizer=tokenizer, desc=f"index {info.name}", repo=repo,
                       server_tokenize=server_tokenize)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / "embeddings.npy", emb)  # the index's source: another index type needs no re-embedding
        write_passages(tmp, rows)
        write_search_index(tmp, emb, index, meta)
    return meta


def search(
    url: str | TritonServer, model: str, index_dir: str | Path, query: str, k: int = 10,
    protocol: str = "http", tokenizer: str | Path | None = None, repo: str | Path | None = None,
    nprobe: int | None = None, ef_search: int | None = None, server_tokenize: bool = False,
) -> list[tuple[str, float, str]]:
    """Top-k passages by inner product on the index's FAISS index: [(pid, score, text)], best first.
    Exact for a flat index; `nprobe` (IVF) and `ef_search` (HNSW) override the index's own settings.

    `model` is the index's query model (the shared encoder, or the pair's query tower) or the
    pair's name; any other model is refused, since its embeddings do not live in the index's space.
    """
    index_dir = Path(index_dir)
    if not (index_dir / "index.json").exists():
        raise DrscalingError(f"{index_dir} is not an index (no index.json): run build_index first")
    if k < 1:
        raise DrscalingError(f"k must be >= 1 (got {k})")
    meta = json.loads((index_dir / "index.json").read_text())
    query_model = meta.get("query_model", meta["model"])  # indexes of single encoders predate it
    if model not in (query_model, meta.get("retriever", query_model)):
        pair = (f" (the passage tower of '{meta['retriever']}': query it with '{query_model}' or "
                f"'{meta['retriever']}')" if meta.get("tower") == "passage" else "")
        raise DrscalingError(
            f"the index in {index_dir} was built with model '{meta['model']}'{pair}, not with '{model}': "
            "queries must be embedded by the index's own encoder or its query tower"
        )
    found = _load_index(index_dir)
    vector_index.configure(found, nprobe=nprobe, ef_search=ef_search)
    pids = json.loads((index_dir / "pids.json").read_text())
    if found.ntotal != len(pids):
        raise DrscalingError(f"{index_dir}: the FAISS index holds {found.ntotal} passages but pids.json "
                             f"{len(pids)}: rebuild the index with `drscaling index`")
    texts = [r["text"] for r in read_jsonl(index_dir / "passages.jsonl", required=("text",))]
    with Client(url, protocol) as client:
        info = client.info(query_model)
    if info.dim != found.d:
        raise DrscalingError(
            f"model '{query_model}' embeds in {info.dim} dimensions but the index in {index_dir} holds "
            f"{found.d}-dimensional passages: rebuild the index with the served passage model"
        )
    q = encode_texts(url, query_model, [query], protocol=protocol, max_len=info.max_len("query"),
                     tokenizer=tokenizer, repo=repo, server_tokenize=server_tokenize)
    scores, ids = vector_index.search(found, q, k)
    return [(pids[i], float(s), texts[i]) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]


def _load_index(index_dir: Path):
    """The index's FAISS index; an index written before FAISS (embeddings.npy only) gets an exact one."""
    if (index_dir / vector_index.INDEX_FILE).exists():
        return vector_index.load(index_dir / vector_index.INDEX_FILE)
    return vector_index.build(np.load(index_dir / "embeddings.npy"))
