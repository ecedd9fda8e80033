"""One optimiser step of eq. 3: the step's sample (a pure function of seed and step), the contrastive
loss against shared negatives, AdamW with its learning-rate schedule. Needs only numpy and torch
(benchmarks/gpu_check.py imports it on a bare GPU machine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from drscaling.train.config import TrainConfig

def sample_step(step: int, cfg: TrainConfig, n_pairs: int, pos_corpus_idx: np.ndarray, n_corpus: int):
    """The batch and the shared negative pool of one step, a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    batch = rng.choice(n_pairs, size=min(cfg.batch_size, n_pairs), replace=False)
    exclude = set(pos_corpus_idx[batch].tolist())
    cand = rng.choice(n_corpus, size=cfg.negatives + len(exclude), replace=False)
    negs = np.array([c for c in cand if c not in exclude][: cfg.negatives])
    return batch, negs


def contrastive_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, in_batch: bool) -> torch.Tensor:
    """Eq. 3: -log softmax of s(q_i, p_i+) among itself and the shared negatives."""
    pos = (q * p).sum(-1, keepdim=True)  # [B, 1]
    neg = q @ n.T  # [B, K]
    parts = [pos, neg]
    if in_batch:  # the other queries' positives as extra negatives
        other = q @ p.T
        other = other.masked_fill(torch.eye(len(q), dtype=torch.bool, device=q.device), float("-inf"))
        parts.append(other)
    logits = torch.cat(parts, dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def lr_factor(step: int, warmup_steps: int, total_steps: int = 0, schedule: str = "constant") -> float:
    """The learning-rate multiplier at `step`: linear warmup, then constant or linear decay to 0 at
    `total_steps` (the authors' HF Trainer schedule)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "linear" and total_steps > warmup_steps:
        return max(0.0, (total_steps - step) / (total_steps - warmup_steps))
    return 1.0


def optimizer(module: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int = 0,
              schedule: str = "constant"):
    """AdamW (no weight decay on biases and norms; fused kernels on CUDA) with the lr_factor schedule,
    for training and distillation."""
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    fused = all(p.is_cuda for p in module.parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, total_steps, schedule))
    return opt, sched


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """Host tensors onto the device: pinned and non-blocking on CUDA, so copies overlap compute."""
    if device == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, opt, sched, q: dict, p: dict, n_queries: int, in_batch: bool, autocast, device: str,
               max_grad_norm: float = 0.0) -> torch.Tensor:
    """One optimiser step of eq. 3: p holds the queries' positives first, then the shared negatives.
    (benchmarks/train_step.py and benchmarks/gpu_check.py time exactly this.)"""
    q, p = to_device(q, device), to_device(p, device)
    with autocast:
        qe, pe = model(q["input_ids"], q["attention_mask"], p["input_ids"], p["attention_mask"])
        loss = contrastive_loss(qe, pe[:n_queries], pe[n_queries:], in_batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    if sched is not None:
        sched.step()
    return loss


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
