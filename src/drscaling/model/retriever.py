"""A retriever in use: each tower an encoder with the tokenizer and metadata it travels with, and
`encode`, which embeds texts in length-sorted batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from drscaling.model.encoder import Encoder, ModelMeta
from drscaling.model.tokenizer import tokenize

SIDES = ("query", "passage")  # a retriever's two towers, in the order files and exports list them


@dataclass
class Tower:
    """One side of a retriever: an encoder with the tokenizer and metadata it travels with."""

    encoder: Encoder
    tokenizer: object
    meta: ModelMeta

    def encode(self, texts: list[str], max_len: int, batch_size: int = 128, device: str = "cpu",
               desc: str | None = None) -> np.ndarray:
        return encode(self.encoder, self.tokenizer, texts, max_len, batch_size, device, desc)


@dataclass
class Retriever:
    """The query tower and the passage tower (the same object when shared)."""

    query: Tower
    passage: Tower

    @property
    def shared(self) -> bool:
        return self.query is self.passage

    def to(self, device: str) -> Retriever:
        self.query.encoder.to(device)
        self.passage.encoder.to(device)
        return self

    @classmethod
    def single(cls, tower: Tower) -> Retriever:
        return cls(tower, tower)


@torch.inference_mode()
def encode(
    encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int = 128,
    device: str = "cpu", desc: str | None = None,
) -> np.ndarray:
    """Embed texts in batches (sorted by length, so padding is small); returns float32 [n, dim]."""
    encoder.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), _out_dim(encoder)), dtype=np.float32)
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenize(tokenizer, [texts[i] for i in idx], max_len)
        emb = encoder(**{k: v.to(device) for k, v in enc.items()})
        out[idx] = emb.float().cpu().numpy()
    return out


def _out_dim(encoder: Encoder) -> int:
    proj = encoder.projection
    return proj.out_features if isinstance(proj, nn.Linear) else encoder.backbone.config.hidden_size
