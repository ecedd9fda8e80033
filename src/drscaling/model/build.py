"""Building an Encoder of a shape: a BERT zoo shape from config, a pretrained checkpoint (a folder,
hub name or packaged encoder), a pretrained-series cut or a decoder LLM; and how its head starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from drscaling.errors import DrscalingError
from drscaling.model.encoder import POOLINGS, Encoder, ModelMeta, non_embedding_params
from drscaling.model.shapes import LLMS, llm_folder, parse_shape, resolve, series_layers, series_shape

PROJECTIONS = ("identity", "random")


def build_model(
    shape: str, tokenizer, dim: int = 768, max_positions: int = 512, seed: int = 0,
    init: str | None = None, scale: float = 0.0, pooling: str = "", projection: str = "random",
) -> tuple[Encoder, ModelMeta]:
    """A zoo shape from config (init=None), or a pretrained encoder (init = folder or hub name).
    scale > 0: unit-normalised embeddings times scale (see ModelMeta.scale); pooling: "" = the
    shape's own (mean), else mean or last; projection: how the head starts (init_projection)."""
    if projection not in PROJECTIONS:
        raise DrscalingError(f"projection must be one of {', '.join(PROJECTIONS)} (got '{projection}')")
    if scale < 0:
        raise DrscalingError(f"scale must be >= 0 (got {scale})")
    if pooling and pooling not in POOLINGS:
        raise DrscalingError(f"pooling must be one of {', '.join(POOLINGS)} (got '{pooling}')")
    encoder, meta = _build(shape, tokenizer, dim, max_positions, seed, init)
    meta.projection = init_projection(encoder.projection, projection)
    encoder.scale = meta.scale = scale
    if pooling:
        encoder.pooling = meta.pooling = pooling
    return encoder, meta


def init_projection(head: nn.Linear, how: str) -> str:
    """`identity`: weight [I; 0] and bias 0, so the embedding is the pooled state padded with zeros and a
    pretrained encoder starts exactly at its zero-shot point (a random head costs ~0.4-0.5 nats of CE
    at step 0). Needs hidden <= dim; otherwise the random head is kept. Returns what the head is."""
    if how != "identity" or head.in_features > head.out_features:
        return "random"
    with torch.no_grad():
        head.weight.zero_()
        head.weight[: head.in_features].copy_(torch.eye(head.in_features))
        head.bias.zero_()
    return "identity"


def _build(shape: str, tokenizer, dim: int, max_positions: int, seed: int, init: str | None) -> tuple[Encoder, ModelMeta]:
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(seed)
    if shape in LLMS:
        return _build_llm(shape, dim, init)
    series = series_shape(shape)
    if series:
        return _build_series(shape, series, dim)
    if init:
        init = resolve(init)
        local = Path(init)
        if not local.exists() and "/" not in init:
            raise DrscalingError(f"checkpoint not found: {init}")
        try:
            backbone = AutoModel.from_pretrained(init, add_pooling_layer=False)
        except TypeError:
            backbone = AutoModel.from_pretrained(init)
        except OSError as exc:
            raise DrscalingError(f"cannot load checkpoint '{init}': {exc}") from exc
        max_positions = int(getattr(backbone.config, "max_position_embeddings", max_positions))
        name = shape or local.name
    else:
        s = parse_shape(shape)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=s.intermediate,
            max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        )
        backbone = BertModel(config, add_pooling_layer=False)
        name = s.name
    encoder = Encoder(backbone, dim)
    meta = ModelMeta(
        shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
        max_positions=max_positions, init=init or "scratch",
    )
    return encoder, meta


def _build_series(name: str, series: tuple[str, int], dim: int) -> tuple[Encoder, ModelMeta]:
    from transformers import AutoModel

    checkpoint, k = series
    keep = series_layers(name)
    backbone = AutoModel.from_pretrained(resolve(checkpoint), add_pooling_layer=False)
    backbone.encoder.layer = nn.ModuleList([backbone.encoder.layer[i] for i in keep])
    backbone.config.num_hidden_layers = k
    encoder = Encoder(backbone, dim)
    meta = ModelMeta(shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
                     max_positions=int(backbone.config.max_position_embeddings),
                     init=f"{checkpoint}[layers {','.join(map(str, keep))}]")
    return encoder, meta


def _build_llm(name: str, dim: int, folder: str | None = None) -> tuple[Encoder, ModelMeta]:
    """A decoder tower from a checkpoint folder (an init), else from the shape's packaged weights."""
    from transformers import AutoModel

    folder = folder or llm_folder(name)
    backbone = AutoModel.from_pretrained(folder)  # the decoder without its LM head
    backbone.config.use_cache = False  # an encoder: no key/value cache in training or export
    encoder = Encoder(backbone, dim)
    # SmolLM2's final hidden states have norms near 50 (its last RMSNorm gains average 1.8), so the
    # default head gives embeddings of norm ~32 and dot products near 1,000: a saturated softmax that
    # diverged in training. A 5x smaller initial head starts the norms near 6, as all-MiniLM's do.
    with torch.no_grad():
        encoder.projection.weight.mul_(0.2)
    meta = ModelMeta(shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
                     max_positions=int(backbone.config.max_position_embeddings), init=folder)
    return encoder, meta
