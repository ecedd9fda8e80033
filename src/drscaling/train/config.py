"""A training run's configuration (TrainConfig, whose key() is the run's identity), its folders, and
the checks made on both before any compute."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from drscaling.checkpoints import SCRATCH
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig
from drscaling.model.shapes import series_layers

TOWER_KINDS = ("shared", "dual")
LR_SCHEDULES = ("linear", "constant")


@dataclass
class Schedule:
    """The pairs a run learns from and its AdamW schedule: what a training run (TrainConfig) and a
    query-tower distillation (drscaling.distill.DistillConfig) both set, with training's defaults."""

    annotation_source: str = "human"  # whose annotated pairs (distill: their queries) the run learns from
    train_pairs: int = 0  # D: the first D pairs of the run's seeded order (train.data.training_pairs); 0 = all
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.001

    def check_schedule(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise DrscalingError(f"steps, batch_size and lr must be positive (got {self.steps}, {self.batch_size}, {self.lr})")


@dataclass
class TrainConfig(Schedule):
    # Schedule's fields come first; key() sorts the fields, so their order is not part of a run's identity.
    shape: str = "bert-L2-H128"
    init: str = ""  # "" = the shape's default; scratch; a folder, hub id or template (drscaling.checkpoints)
    towers: str = "shared"  # shared: one encoder (the paper); dual: separate query and passage towers
    negatives: int = 256
    in_batch_negatives: bool = False
    max_query_len: int = 25
    max_passage_len: int = 180
    dim: int = 768
    scale: float = 0.0  # 0: dot product (the paper); s > 0: cosine x s^2 (LLM towers: their hidden states are anisotropic)
    pooling: str = ""  # "" = mean; "last" = the last token's state (decoders)
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 50
    bf16: bool = True  # used only on CUDA
    gradient_checkpointing: bool = False
    projection: str = "identity"  # identity: the head starts as [I; 0], so a pretrained init starts at its zero-shot point; random
    lr_schedule: str = "linear"  # linear: decay to 0 after warmup (the authors' HF Trainer); constant
    max_grad_norm: float = 1.0  # gradient clipping (the authors' HF Trainer); 0 = off
    compile: bool = False  # torch.compile the towers (CUDA; worth it for long runs)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def key(self) -> str:
        """Identity of a run: same key and same data = same results, so it is never trained twice."""
        d = dataclasses.asdict(self)
        d.pop("eval_every", None), d.pop("checkpoint_every", None)
        if not d["eval"]["negative_pool"]:  # the whole corpus, as before the field existed: same keys
            d["eval"].pop("negative_pool")
        if d["init"] == SCRATCH:  # the same run as the default "" (from config), so the same key
            d["init"] = ""
        if layers := series_layers(self.shape):  # which layers a series shape keeps is part of what was trained
            d["series_layers"] = layers
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Paths:
    prepared: Path
    annotations: Path  # the folder of <source>.jsonl files
    tokenizer: Path
    out: Path  # the run's folder: checkpoint/, model/, metrics.json


def check_config(cfg: TrainConfig, n_corpus: int) -> None:
    if cfg.towers not in TOWER_KINDS:
        raise DrscalingError(f"towers must be one of {', '.join(TOWER_KINDS)} (got '{cfg.towers}')")
    cfg.check_schedule()
    if cfg.negatives < 1:
        raise DrscalingError(f"negatives must be >= 1 (got {cfg.negatives})")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise DrscalingError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got '{cfg.lr_schedule}')")
    if cfg.max_grad_norm < 0:
        raise DrscalingError(f"max_grad_norm must be >= 0 (got {cfg.max_grad_norm})")
    if cfg.negatives + cfg.batch_size > n_corpus:
        raise DrscalingError(
            f"the train corpus has {n_corpus} passages, too few for {cfg.negatives} negatives"
            f" plus a batch of {cfg.batch_size}"
        )
