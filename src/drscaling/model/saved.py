"""The saved model folder (see drscaling.model): one encoder with its tokenizer and ModelMeta, or dual
towers as query/ + passage/ + towers.json; a plain HF encoder folder also loads, as is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, dumps
from drscaling.model.encoder import Encoder, ModelMeta, PlainEncoder, non_embedding_params
from drscaling.model.retriever import SIDES, Retriever, Tower
from drscaling.model.shapes import resolve
from drscaling.model.tokenizer import load_tokenizer

TOWERS_FILE = "towers.json"  # a dual model folder's marker: its towers' metadata
META_FILE = "drscaling.json"  # a tower's (or a shared model's) metadata: ModelMeta


def save_retriever(retriever: Retriever, dest: str | Path, extra: dict | None = None) -> None:
    """A shared retriever as one model folder; dual towers as query/ + passage/ + towers.json."""
    if retriever.shared:
        t = retriever.query
        save_model(t.encoder, t.tokenizer, t.meta, dest)
        return
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        for side in SIDES:
            t = getattr(retriever, side)
            save_model(t.encoder, t.tokenizer, t.meta, tmp / side)
        info = {side: dataclasses.asdict(getattr(retriever, side).meta) for side in SIDES}
        (tmp / TOWERS_FILE).write_text(dumps(info | (extra or {}), indent=2))


def is_dual(path: str | Path) -> bool:
    return (Path(path) / TOWERS_FILE).exists()


def load_retriever(path: str | Path) -> Retriever:
    """Either kind of saved model (or a plain HF encoder folder) as a query and a passage tower."""
    path = Path(resolve(str(path)))
    if is_dual(path):
        q, p = (Tower(*load_model(path / side)) for side in SIDES)
        if q.meta.dim != p.meta.dim:
            raise DrscalingError(
                f"{path}: the query tower embeds in {q.meta.dim} dimensions, the passage tower in {p.meta.dim}"
            )
        return Retriever(q, p)
    return Retriever.single(Tower(*load_model(path)))


def save_model(encoder: Encoder, tokenizer, meta: ModelMeta, dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        encoder.backbone.save_pretrained(tmp / "backbone")
        tokenizer.save_pretrained(tmp / "tokenizer")
        torch.save(encoder.projection.state_dict(), tmp / "projection.pt")
        (tmp / META_FILE).write_text(dumps(dataclasses.asdict(meta), indent=2))


def load_model(path: str | Path) -> tuple[Encoder, object, ModelMeta]:
    """Load a saved model folder. A plain HF encoder folder (no drscaling.json) also works: it is
    used with mean pooling and no projection, so no random head is invented for a baseline."""
    from transformers import AutoModel

    path = Path(resolve(str(path)))
    meta_file = path / META_FILE
    if is_dual(path):
        raise DrscalingError(f"{path} holds dual towers (query/ and passage/): load it with load_retriever")
    if meta_file.exists():
        meta = ModelMeta.from_dict(json.loads(meta_file.read_text()))
        try:
            backbone = AutoModel.from_pretrained(str(path / "backbone"), add_pooling_layer=False)
        except TypeError:  # decoders take no pooling-layer argument
            backbone = AutoModel.from_pretrained(str(path / "backbone"))
        encoder = Encoder(backbone, meta.dim, meta.pooling, meta.scale)
        encoder.projection.load_state_dict(torch.load(path / "projection.pt", weights_only=True))
        tokenizer = load_tokenizer(path / "tokenizer")
        return encoder.eval(), tokenizer, meta
    if (path / "config.json").exists():
        return load_plain_encoder(path)
    raise DrscalingError(f"{path} is neither a drscaling model folder nor a HF encoder folder")


def load_plain_encoder(path: Path) -> tuple[Encoder, object, ModelMeta]:
    from transformers import AutoModel

    try:
        backbone = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    except TypeError:
        backbone = AutoModel.from_pretrained(str(path))
    encoder = PlainEncoder(backbone)
    meta = ModelMeta(
        shape=path.name, dim=backbone.config.hidden_size, n_non_embedding=non_embedding_params(encoder),
        max_positions=int(backbone.config.max_position_embeddings), init=str(path),
    )
    return encoder.eval(), load_tokenizer(path), meta
