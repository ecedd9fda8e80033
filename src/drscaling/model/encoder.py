"""The network: f(x) = Linear(pool(Transformer(x))), one Encoder per tower, and Towers, which embeds
both sides in one forward call.

Pooling: `mean` (masked mean over tokens; the default for every shape) or `last` (the hidden state of
the last real token, as in RepLLaMA: a decoder's tokenizer appends an end-of-text token to every
text, so under causal attention that position has seen the whole text). Measured zero-shot on the
Debian test split (300 queries, 256 negatives, cosine x 20): SmolLM2 mean pooling 4.84, last token
6.56, chance 5.55, so mean is what a few CPU steps can start from; last-token pooling needs long
training. `scale` > 0 scores by cosine x scale^2 instead of the raw dot product: an LLM's hidden
states are anisotropic (norms near 50, cosines near 1), which saturates a dot-product softmax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from drscaling.errors import DrscalingError

POOLINGS = ("mean", "last")


@dataclass
class ModelMeta:
    shape: str  # zoo name, or a free name for a pretrained folder
    dim: int = 768
    pooling: str = "mean"
    scale: float = 0.0  # 0: raw dot product (the paper); s > 0: embeddings of norm s (cosine x s^2)
    n_non_embedding: int = 0
    max_positions: int = 512
    max_query_len: int = 32
    max_passage_len: int = 180
    init: str = "scratch"  # scratch | path or hub name of the checkpoint
    projection: str = "random"  # how the head started: identity ([I; 0]) or random

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Encoder(nn.Module):
    """Transformer -> pooling (masked mean, or last real token) -> Linear(hidden, dim)."""

    def __init__(self, backbone: nn.Module, dim: int, pooling: str = "mean", scale: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise DrscalingError(f"pooling must be one of {', '.join(POOLINGS)} (got '{pooling}')")
        if scale < 0:
            raise DrscalingError(f"scale must be >= 0 (got {scale})")
        self.backbone = backbone
        self.pooling = pooling
        self.scale = scale
        self.projection = nn.Linear(backbone.config.hidden_size, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "last":  # right padding: the last real token sits at length - 1
            last = (attention_mask.sum(1) - 1).clamp(min=0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.projection(pooled)
        if self.scale:  # scale * unit vector: the dot product of two is cosine / temperature, scale^2 = 1/T
            out = self.scale * nn.functional.normalize(out, dim=-1)
        return out


class Towers(nn.Module):
    """The query and passage encoders: one shared module (the paper) or two (ScalingNote).

    One forward call embeds both sides, so DistributedDataParallel sees a single forward per step.
    """

    def __init__(self, query: Encoder, passage: Encoder | None = None):
        super().__init__()
        self.query = query
        if passage is not None and passage is not query:
            self.passage = passage  # registered only when separate: a shared tower is stored once

    @property
    def shared(self) -> bool:
        return "passage" not in self._modules

    def passage_encoder(self) -> Encoder:
        return self._modules.get("passage", self.query)

    def forward(self, q_ids, q_mask, p_ids, p_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(q_ids, q_mask), self.passage_encoder()(p_ids, p_mask)


def non_embedding_params(encoder: Encoder) -> int:
    """N: every parameter except the token, position and token-type embedding tables."""
    embedding_tables = {
        id(m.weight) for m in encoder.backbone.modules() if isinstance(m, nn.Embedding)
    }
    return sum(p.numel() for p in encoder.parameters() if id(p) not in embedding_tables)


class PlainEncoder(Encoder):
    """A pretrained HF encoder used as is: mean pooling, no projection (for zero-shot baselines)."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, backbone.config.hidden_size)
        self.projection = nn.Identity()


def check_lengths(meta: ModelMeta, *lengths: int) -> None:
    for n in lengths:
        if n < 2:
            raise DrscalingError(f"max length {n} is too short (need room for [CLS] and [SEP])")
        if n > meta.max_positions:
            raise DrscalingError(
                f"max length {n} exceeds the model's {meta.max_positions} positions ({meta.shape})"
            )
