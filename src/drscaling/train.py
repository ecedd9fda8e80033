"""Fine-tune one dense retriever of shape N on D annotated pairs (paper section 3.4) and track it in MLflow.

Loss (eq. 3): for each batch, a pool of `negatives` random train-corpus passages (batch positives
excluded) is shared by every query; cross-entropy of the positive against that pool, optionally with
the other queries' positives as extra in-batch negatives. Fixed number of steps, AdamW.

Every step's sample is a pure function of (seed, step), and the checkpoint stores model, optimiser,
scheduler and torch RNG state, so a run killed mid-way and started again with the same parameters
resumes and ends with the same metrics as an uninterrupted one.

The run records the best dev contrastive entropy, the test contrastive entropy at that checkpoint,
and the minimum test contrastive entropy over training (the paper's figure of merit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from drscaling import tracking
from drscaling.annotate import load_annotations
from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, cached_evalset, embed_evalset, encode_fns, rank_split
from drscaling.files import atomic_path, write_json
from drscaling.model import (
    ModelMeta, Retriever, Tower, Towers, build_model, check_lengths, load_retriever, save_retriever,
    shape_tokenizer, tokenize,
)

TOWER_KINDS = ("shared", "dual")


@dataclass
class TrainConfig:
    shape: str = "bert-L2-H128"
    init: str = ""  # "" = from config with the shared tokenizer; else a folder or hub name
    towers: str = "shared"  # shared: one encoder (the paper); dual: separate query and passage towers
    annotation_source: str = "human"
    train_pairs: int = 0  # D; 0 = all available pairs
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.001
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
    eval: EvalConfig = field(default_factory=EvalConfig)

    def key(self) -> str:
        """Identity of a run: same key and same data = same results, so it is never trained twice."""
        d = dataclasses.asdict(self)
        d.pop("eval_every", None), d.pop("checkpoint_every", None)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Paths:
    prepared: Path
    annotations: Path  # the folder of <source>.jsonl files
    tokenizer: Path
    out: Path  # the run's folder: checkpoint/, model/, metrics.json


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def training_pairs(paths: Paths, source: str, train_pairs: int, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(queries, positive pids, positive passages, corpus texts) for the first D pairs of a seeded
    permutation: smaller D are subsets of larger ones, as in a data-size sweep. D = 0: all pairs."""
    ann = load_annotations(paths.annotations / f"{source}.jsonl")
    corpus = load_split(paths.prepared, "train").corpus
    text = dict(zip(corpus["pid"], corpus["text"], strict=True))
    ann = ann[ann["pid"].isin(text.keys())]
    available = len(ann)
    d = train_pairs or available
    if d > available:
        raise DrscalingError(f"train_pairs={d} but source '{source}' has only {available} pairs")
    if d < 1:
        raise DrscalingError("train_pairs must be >= 1")
    order = np.random.default_rng(seed).permutation(available)[:d]
    ann = ann.iloc[order]
    return list(ann["query"]), list(ann["pid"]), [text[p] for p in ann["pid"]], list(corpus["text"])


def check_config(cfg: TrainConfig, n_corpus: int) -> None:
    if cfg.towers not in TOWER_KINDS:
        raise DrscalingError(f"towers must be one of {', '.join(TOWER_KINDS)} (got '{cfg.towers}')")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DrscalingError(f"steps, batch_size and lr must be positive (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})")
    if cfg.negatives < 1:
        raise DrscalingError(f"negatives must be >= 1 (got {cfg.negatives})")
    if cfg.negatives + cfg.batch_size > n_corpus:
        raise DrscalingError(
            f"the train corpus has {n_corpus} passages, too few for {cfg.negatives} negatives"
            f" plus a batch of {cfg.batch_size}"
        )


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


def optimizer(module: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int):
    """AdamW (no weight decay on biases and norms) with a linear warmup, for training and distillation."""
    decay = [p for p in module.parameters() if p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    return opt, sched


def train_step(model, opt, sched, q: dict, p: dict, n_queries: int, in_batch: bool, autocast, device: str) -> torch.Tensor:
    """One optimiser step of eq. 3: p holds the queries' positives first, then the shared negatives.
    (benchmarks/train_step.py times exactly this.)"""
    with autocast:
        qe, pe = model(q["input_ids"].to(device), q["attention_mask"].to(device),
                       p["input_ids"].to(device), p["attention_mask"].to(device))
        loss = contrastive_loss(qe, pe[:n_queries], pe[n_queries:], in_batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, towers: Towers, opt, sched, state: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.mkdir()
        torch.save(
            {"model": towers.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "torch_rng": torch.get_rng_state(), "state": state},
            tmp / "checkpoint.pt",
        )


def load_checkpoint(path: Path, cfg: TrainConfig, towers: Towers, opt, sched) -> dict | None:
    file = path / "checkpoint.pt"
    if not file.exists():
        return None
    ck = torch.load(file, weights_only=False)
    state = ck["state"]
    if state.get("config_key") != cfg.key():
        raise DrscalingError(
            f"checkpoint {path} was made with different parameters (shape {state.get('shape')});"
            " use another output folder or delete the checkpoint"
        )
    try:
        towers.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise DrscalingError(f"checkpoint {path} does not fit shape {cfg.shape}: {exc}") from exc
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    torch.set_rng_state(ck["torch_rng"])
    return state


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ddp() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def train(cfg: TrainConfig, paths: Paths, tags: dict[str, str] | None = None) -> dict:
    """Train (or resume) one run; returns its final metrics. Checks every input before any compute."""
    rank, world = _ddp()
    queries, pos_pids, pos_texts, corpus_texts = training_pairs(paths, cfg.annotation_source, cfg.train_pairs, cfg.seed)  # clear errors first
    data_key = tracking.file_version(paths.annotations / f"{cfg.annotation_source}.jsonl") + tracking.file_version(paths.prepared)
    done = finished(paths.out, cfg, data_key)
    if done:
        return done | {"resumed": False, "cached": True}
    check_config(cfg, len(corpus_texts))
    corpus_pids = list(load_split(paths.prepared, "train").corpus["pid"])
    cindex = {p: i for i, p in enumerate(corpus_pids)}
    pos_idx = np.array([cindex[p] for p in pos_pids])

    tokenizer = shape_tokenizer(cfg.shape, cfg.init, paths.tokenizer)
    encoder, meta = build_model(cfg.shape, tokenizer, cfg.dim, seed=cfg.seed, init=cfg.init or None, scale=cfg.scale,
                                pooling=cfg.pooling)
    meta.max_query_len, meta.max_passage_len = cfg.eval.max_query_len, cfg.max_passage_len
    check_lengths(meta, cfg.max_query_len, cfg.max_passage_len, cfg.eval.max_query_len, cfg.eval.max_passage_len)
    # Dual towers start as two copies of the same checkpoint (ScalingNote stage 1), then part ways.
    passage = build_model(cfg.shape, tokenizer, cfg.dim, seed=cfg.seed, init=cfg.init or None, scale=cfg.scale,
                          pooling=cfg.pooling)[0] if cfg.towers == "dual" else None
    towers = Towers(encoder, passage)
    query_tower = Tower(encoder, tokenizer, meta)
    retriever = Retriever(query_tower, Tower(passage, tokenizer, meta) if passage is not None else query_tower)
    dev = cached_evalset(paths.prepared, "dev", cfg.eval)
    test = cached_evalset(paths.prepared, "test", cfg.eval)

    device = _device()
    towers.to(device)
    if cfg.gradient_checkpointing:
        for module in {id(m): m for m in (encoder, towers.passage_encoder())}.values():
            module.backbone.gradient_checkpointing_enable()
    model = towers
    if world > 1:  # one forward per step embeds both sides, as DDP requires
        model = torch.nn.parallel.DistributedDataParallel(towers, device_ids=[rank] if device == "cuda" else None)
    opt, sched = optimizer(towers, cfg.lr, cfg.weight_decay, cfg.warmup_steps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and cfg.bf16 else contextlib.nullcontext()

    ckpt_dir = paths.out / "checkpoint"
    state = load_checkpoint(ckpt_dir, cfg, towers, opt, sched) or {
        "step": 0, "config_key": cfg.key(), "shape": cfg.shape, "run_id": None, "history": [],
        "best_dev": float("inf"), "test_at_best_dev": float("inf"), "test_min": float("inf"),
        "best_step": 0, "step_seconds": [], "tokens": [], "data_key": data_key,
    }
    resumed = state["step"] > 0
    mlflow = _start_mlflow(cfg, meta, len(queries), state, tags, rank)
    best_test: dict = {}  # the best-dev model's test embeddings, reused by the final ranking metrics
    if rank == 0:
        state["run_id"] = mlflow.active_run().info.run_id if mlflow else None
    try:
        bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                   desc=f"train {cfg.shape} D={len(queries)}", disable=rank != 0)
        for step in bar:
            batch, negs = sample_step(step, cfg, len(queries), pos_idx, len(corpus_texts))
            batch = np.array_split(batch, world)[rank]  # DDP: each rank a slice, same negatives
            t0 = time.perf_counter()
            model.train()
            q = tokenize(tokenizer, [queries[i] for i in batch], cfg.max_query_len)
            p = tokenize(tokenizer, [pos_texts[i] for i in batch] + [corpus_texts[i] for i in negs], cfg.max_passage_len)
            loss = train_step(model, opt, sched, q, p, len(batch), cfg.in_batch_negatives, autocast, device)
            state["step_seconds"].append(time.perf_counter() - t0)
            state["tokens"].append(int(q["attention_mask"].sum() + p["attention_mask"].sum()) * world)
            state["step"] = step + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if rank == 0 and mlflow:
                mlflow.log_metric("train_loss", loss.item(), step=step + 1)
            last = step + 1 == cfg.steps
            if rank == 0 and ((step + 1) % cfg.eval_every == 0 or last):
                _evaluate_step(retriever, dev, test, cfg, state, paths, device, mlflow, best_test)
            if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or last):
                save_checkpoint(ckpt_dir, towers, opt, sched, state)
        metrics = _finish(cfg, paths, state, meta, len(queries), device, mlflow, best_test) if rank == 0 else {}
    except BaseException as exc:
        if mlflow and rank == 0:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if mlflow and rank == 0:
        mlflow.end_run()
    metrics["resumed"] = resumed
    return metrics


def finished(out: Path, cfg: TrainConfig, data_key: str) -> dict | None:
    """The metrics of a finished run with the same parameters on the same data, if there is one."""
    file = out / "metrics.json"
    if not file.exists():
        return None
    done = json.loads(file.read_text())
    if done.get("config_key") == cfg.key() and done.get("data_key") == data_key:
        return done
    return None


def _evaluate_step(retriever: Retriever, dev, test, cfg, state, paths, device, mlflow, best_test: dict) -> None:
    fns = encode_fns(retriever, cfg.eval, device)
    ce_dev = embed_evalset(*fns, dev, cfg.eval).ce()
    embedded_test = embed_evalset(*fns, test, cfg.eval)
    ce_test = embedded_test.ce()
    step = state["step"]
    state["history"].append({"step": step, "ce_dev": ce_dev, "ce_test": ce_test})
    state["test_min"] = min(state["test_min"], ce_test)
    if ce_dev < state["best_dev"]:
        state.update(best_dev=ce_dev, test_at_best_dev=ce_test, best_step=step)
        save_retriever(retriever, paths.out / "model")  # the best-dev model is the artifact
        best_test["embedded"] = embedded_test
    if mlflow:
        mlflow.log_metrics({"ce_dev": ce_dev, "ce_test": ce_test}, step=step)


def _start_mlflow(cfg: TrainConfig, meta: ModelMeta, d: int, state: dict, tags, rank: int):
    if rank != 0:
        return None
    tracking.configure()
    import mlflow

    nested = mlflow.active_run() is not None  # inside a sweep: a child of its parent run
    if not nested:
        mlflow.set_experiment(os.environ.get("DRSCALING_EXPERIMENT", "train"))
    if state.get("run_id"):
        mlflow.start_run(run_id=state["run_id"], log_system_metrics=True, nested=nested)
        return mlflow
    mlflow.start_run(run_name=f"{cfg.shape}-D{d}-{cfg.annotation_source}", log_system_metrics=True, nested=nested)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval"}
    params |= {f"eval_{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}
    params |= {"n_non_embedding": meta.n_non_embedding, "d": d, "config_key": cfg.key(),
               "n_non_embedding_total": meta.n_non_embedding * (2 if cfg.towers == "dual" else 1),
               "git_commit": tracking.git_commit(), "data_version": tracking.data_version(),
               "device": _device()}
    mlflow.log_params(params)
    mlflow.set_tags({"drscaling.stage": "train", "shape": cfg.shape, "source": cfg.annotation_source, "towers": cfg.towers,
                     "n": str(meta.n_non_embedding), "d": str(d), **(tags or {})})
    return mlflow


def _finish(cfg, paths, state, meta, d, device, mlflow, best_test: dict) -> dict:
    # A resumed run may not hold the best model's test embeddings: then the ranking encodes them.
    best = load_retriever(paths.out / "model").to(device)
    test = load_split(paths.prepared, "test")
    ranks = rank_split(best, paths.prepared, test, cfg.eval, device, known=best_test.get("embedded")) if cfg.eval.rank_pool else {}
    secs = state["step_seconds"]
    metrics = {
        "ce_dev_best": state["best_dev"], "ce_test_at_best_dev": state["test_at_best_dev"],
        "ce_test_min": state["test_min"], "best_step": state["best_step"], **ranks,
        "train_step_seconds": statistics.median(secs) if secs else float("nan"),
        "train_tokens_per_step": float(np.mean(state["tokens"])) if state["tokens"] else 0.0,
    }
    result = {"shape": cfg.shape, "n": meta.n_non_embedding, "d": d, "source": cfg.annotation_source,
              "steps": cfg.steps, "config_key": cfg.key(), "data_key": state["data_key"], "run_id": state["run_id"],
              "history": state["history"], **metrics}
    if mlflow:
        mlflow.log_metrics(tracking.metric_names(metrics))
        mlflow.log_artifacts(str(paths.out / "model"), artifact_path="model")
        mlflow.log_dict(state["history"], "history.json")
    write_json(paths.out / "metrics.json", result)  # last: its presence marks the run finished
    shutil.rmtree(paths.out / "checkpoint", ignore_errors=True)  # finished: metrics.json is the record
    return result
