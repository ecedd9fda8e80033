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
import pickle
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from drscaling import registry, tracking
from drscaling.annotate import load_annotations
from drscaling.checkpoints import SCRATCH, Start, resolve_start
from drscaling.data import Corpus, load_split
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, cached_evalset, embed_evalset, encode_fns, rank_split
from drscaling.files import NoRoomError, atomic_path, folder_lock, read_json, to_json, write_json
from drscaling.model import (
    ModelMeta, Retriever, Tower, Towers, build_model, check_lengths, load_retriever, save_retriever,
    series_layers, shape_tokenizer, tokenize, uses_shared_tokenizer,
)

TOWER_KINDS = ("shared", "dual")
LR_SCHEDULES = ("linear", "constant")
# A run has converged when the best test CE improved by less than this (relative) over the last
# quarter of its steps: more steps would not move the point its law is fitted on.
CONVERGENCE_TOLERANCE = 0.02
CHECKPOINT_DIR = "checkpoint"  # <out>/checkpoint/checkpoint.pt while a run is unfinished


@dataclass
class TrainConfig:
    shape: str = "bert-L2-H128"
    init: str = ""  # "" = the shape's default; scratch; a folder, hub id or template (drscaling.checkpoints)
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


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def training_pairs(paths: Paths, source: str, train_pairs: int, seed: int) -> tuple[list[str], list[str], list[str], Corpus]:
    """(queries, positive pids, positive passages, the train corpus) for the first D pairs of a seeded
    permutation: smaller D are subsets of larger ones, as in a data-size sweep. D = 0: all pairs.
    The corpus is read lean: a step reads its negatives' texts from the file, not from 8.8M strings."""
    ann_path = paths.annotations / f"{source}.jsonl"
    ann = load_annotations(ann_path)
    corpus = load_split(paths.prepared, "train", lean=True).corpus
    check_annotations_match(ann, corpus, ann_path, paths.prepared)
    available = len(ann)
    d = train_pairs or available
    if d > available:
        raise DrscalingError(f"train_pairs={d} but source '{source}' has only {available} pairs")
    if d < 1:
        raise DrscalingError("train_pairs must be >= 1")
    order = np.random.default_rng(seed).permutation(available)[:d]
    ann = ann.iloc[order]
    return list(ann["query"]), list(ann["pid"]), corpus.texts(corpus.index_of(ann["pid"])), corpus


def check_annotations_match(ann, corpus: Corpus, ann_path: Path, prepared: Path) -> None:
    """Every annotation must name a passage of the train corpus it is trained against: one that does
    not was made from another dataset (or another import of it), and training on the rest would
    silently measure something else."""
    unknown = corpus.index_of(ann["pid"]) < 0
    if unknown.any():
        corpus_file = Path(prepared) / "train" / "corpus.jsonl"
        raise DrscalingError(
            f"{ann_path}: {int(unknown.sum()):,} of {len(ann):,} annotations name passages that are not in the "
            f"train corpus {corpus_file} (e.g. pid {ann.loc[unknown, 'pid'].iloc[0]!r}): the annotations were "
            f"made from another dataset. Annotate this one (`drscaling annotate --source <source> --prepared "
            f"{prepared} --out <folder>/<source>.jsonl`) and pass that folder as --annotations")


def check_config(cfg: TrainConfig, n_corpus: int) -> None:
    if cfg.towers not in TOWER_KINDS:
        raise DrscalingError(f"towers must be one of {', '.join(TOWER_KINDS)} (got '{cfg.towers}')")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DrscalingError(f"steps, batch_size and lr must be positive (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})")
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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, towers: Towers, opt, sched, state: dict) -> None:
    """Write the checkpoint whole or not at all: the previous one stays until the new one is complete."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        try:
            torch.save(
                {"model": towers.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "torch_rng": torch.get_rng_state(), "state": state},
                tmp / "checkpoint.pt",
            )
        except RuntimeError as exc:  # torch's zip writer reports a failed write (no room) without an errno
            raise NoRoomError(path, f"torch.save failed: {str(exc).strip()[:200]}") from exc


def read_checkpoint(path: Path, cfg: TrainConfig, data_key: str = "") -> dict | None:
    """The saved checkpoint of an interrupted run, or None; read before anything is built, so a
    checkpoint that cannot be resumed is refused before any compute. Refuses, with what to do, one
    that is unreadable, was made for another shape, with other parameters or on other data. Only
    tensors and plain containers are unpickled (weights_only)."""
    file = path / "checkpoint.pt"
    if not file.exists():
        return None
    # Named for every command that trains: a sweep or study point has no --discard-checkpoint flag.
    discard = (f"delete {path} to start {cfg.shape} afresh (`drscaling train`: rerun with --discard-checkpoint,"
               " which deletes it)")
    try:
        ck = torch.load(file, weights_only=True)
        state = ck["state"]
    except pickle.UnpicklingError as exc:  # torch's own text advises weights_only=False: never here
        raise DrscalingError(f"checkpoint {file} holds objects other than tensors and plain containers, which are"
                             f" not loaded (unpickling them could run code); {discard}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated zip, missing keys: all unusable
        raise DrscalingError(f"checkpoint {file} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); {discard}") from exc
    if state.get("shape") != cfg.shape:
        raise DrscalingError(
            f"checkpoint {path} was made for shape {state.get('shape')}, not {cfg.shape}: its weights cannot"
            f" continue another shape; use another output folder or {discard}"
        )
    if state.get("config_key") != cfg.key():
        raise DrscalingError(
            f"checkpoint {path} was made with different parameters (shape {state.get('shape')});"
            " use another output folder or delete the checkpoint"
        )
    if data_key and state.get("data_key") != data_key:
        raise DrscalingError(
            f"checkpoint {path} was trained on other data (the annotations, the prepared splits or the init"
            " checkpoint's weights changed"
            f" since); resuming would mix both: {discard}"
        )
    return ck


def restore_checkpoint(ck: dict, path: Path, cfg: TrainConfig, towers: Towers, opt, sched) -> dict:
    """Load a checkpoint read by read_checkpoint into the built towers, optimiser and schedule; returns
    the run's saved state. (The torch generator is restored by the caller, last.)"""
    try:
        towers.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise DrscalingError(f"checkpoint {path} does not fit shape {cfg.shape}: {exc}") from exc
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    return ck["state"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, `docker stop` and Kubernetes send), raised at a step boundary."""


@contextlib.contextmanager
def sigterm_at_step_boundary() -> Iterator[dict]:
    """Turn SIGTERM into a flag the training loop checks after each step, so the run checkpoints a
    consistent state and ends KILLED instead of dying mid-update with its MLflow run left RUNNING."""
    flag = {"term": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_term(signum, frame):  # noqa: ARG001
        flag["term"] = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@dataclass
class _Data:
    """A run's training data: the pairs, the corpus negatives are drawn from, and its version."""

    queries: list[str]
    pos_texts: list[str]
    corpus: Corpus  # the train corpus negatives are drawn from (texts read per step)
    pos_idx: np.ndarray  # each pair's positive as an index into corpus
    versions: dict[str, str]  # content hashes of the annotations, the prepared splits (and shared tokenizer)
    key: str  # data_key: those hashes, plus a named init checkpoint's


@dataclass
class _Run:
    """Everything one training run builds before its first step."""

    towers: Towers
    model: torch.nn.Module  # towers, compiled and/or wrapped in DDP
    retriever: Retriever
    tokenizer: object
    meta: ModelMeta
    opt: torch.optim.Optimizer
    sched: object
    autocast: contextlib.AbstractContextManager
    device: str
    dev: object
    test: object
    start: Start  # the checkpoint the towers started from
    restored: dict | None = None  # the saved state of the interrupted run this one resumes


def train(cfg: TrainConfig, paths: Paths, tags: dict[str, str] | None = None, discard_checkpoint: bool = False) -> dict:
    """Train (or resume) one run; returns its final metrics. Checks every input before any compute.
    The output folder is locked for the run; SIGTERM checkpoints and ends the MLflow run KILLED."""
    rank, _ = _ddp()
    start = resolve_start(cfg.shape, cfg.init)  # a missing checkpoint fails here, naming it
    data = _training_data(cfg, paths, start)  # clear errors first
    done = finished(paths.out, cfg, data.key)
    if done:
        return done | {"resumed": False, "cached": True}
    check_config(cfg, len(data.corpus))
    lock = folder_lock(paths.out, f"training {cfg.shape}") if rank == 0 else contextlib.nullcontext()
    with lock, sigterm_at_step_boundary() as term:
        if discard_checkpoint:
            shutil.rmtree(paths.out / CHECKPOINT_DIR, ignore_errors=True)
        saved = read_checkpoint(paths.out / CHECKPOINT_DIR, cfg, data.key)  # refused here: before any compute
        return _train(cfg, paths, data, _build_run(cfg, paths, start, saved), tags, term)


def _training_data(cfg: TrainConfig, paths: Paths, start: Start) -> _Data:
    queries, pos_pids, pos_texts, corpus = training_pairs(paths, cfg.annotation_source, cfg.train_pairs, cfg.seed)
    versions = data_versions(paths, cfg.annotation_source, start)
    return _Data(queries, pos_texts, corpus, corpus.index_of(pos_pids), versions,
                 _joined(versions, start))


def data_versions(paths: Paths, source: str, start: Start | None = None) -> dict[str, str]:
    """Content hashes of a run's annotations and of the prepared splits (hashed once per call), and of
    the shared tokenizer when the run tokenises with it (a BERT shape from config: a new vocabulary is
    other data). Runs on their checkpoint's own tokenizer (minilm, LLMs, a named init) have no
    tokenizer_version, so their keys do not move when the shared tokenizer does."""
    versions = {"annotations_version": tracking.file_version(paths.annotations / f"{source}.jsonl"),
                "prepared_version": tracking.file_version(paths.prepared)}
    if start is not None and uses_shared_tokenizer(start.shape, start.load or ""):
        versions["tokenizer_version"] = tracking.file_version(paths.tokenizer)
    return versions


def data_key(paths: Paths, source: str, start: Start | None = None, versions: dict[str, str] | None = None) -> str:
    """The version of the data a run trains on: its annotations and prepared splits, the shared
    tokenizer where it uses it, plus a named init checkpoint's weights (other weights under the same
    name are another run). Without `start`: the annotations and splits alone (a node's data check).
    `versions`: data_versions(paths, source, start) when already hashed (a sweep hashes once)."""
    return _joined(versions or data_versions(paths, source, start), start)


def run_data_key(paths: Paths, cfg: TrainConfig, start: Start | None = None) -> str:
    """The data_key train() records for the run `cfg` describes (`start`: its resolved checkpoint)."""
    return data_key(paths, cfg.annotation_source, start or resolve_start(cfg.shape, cfg.init))


def _joined(versions: dict[str, str], start: Start | None) -> str:
    return (versions["annotations_version"] + versions["prepared_version"] + versions.get("tokenizer_version", "")
            + (start.digest if start and start.load else ""))


def _build_run(cfg: TrainConfig, paths: Paths, start: Start, saved: dict | None = None) -> _Run:
    rank, world = _ddp()
    tokenizer = shape_tokenizer(cfg.shape, start.load or "", paths.tokenizer)
    build = dict(seed=cfg.seed, init=start.load, scale=cfg.scale, pooling=cfg.pooling, projection=cfg.projection)
    encoder, meta = build_model(cfg.shape, tokenizer, cfg.dim, **build)
    if start.load:  # the name the user gave, not the machine's cache path
        meta.init = start.checkpoint
    meta.max_query_len, meta.max_passage_len = cfg.eval.max_query_len, cfg.max_passage_len
    check_lengths(meta, cfg.max_query_len, cfg.max_passage_len, cfg.eval.max_query_len, cfg.eval.max_passage_len)
    # Dual towers start as two copies of the same checkpoint (ScalingNote stage 1), then part ways.
    passage = build_model(cfg.shape, tokenizer, cfg.dim, **build)[0] if cfg.towers == "dual" else None
    towers = Towers(encoder, passage)
    query_tower = Tower(encoder, tokenizer, meta)
    retriever = Retriever(query_tower, Tower(passage, tokenizer, meta) if passage is not None else query_tower)
    device = _device()
    towers.to(device)
    if cfg.gradient_checkpointing:
        for module in {id(m): m for m in (encoder, towers.passage_encoder())}.values():
            module.backbone.gradient_checkpointing_enable()
    model = torch.compile(towers) if cfg.compile else towers
    if world > 1:  # one forward per step embeds both sides, as DDP requires
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    opt, sched = optimizer(towers, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" and cfg.bf16 else contextlib.nullcontext()
    # A checkpoint that does not fit the towers is refused before the evaluation sets are built.
    restored = restore_checkpoint(saved, paths.out / CHECKPOINT_DIR, cfg, towers, opt, sched) if saved else None
    dev = cached_evalset(paths.prepared, "dev", cfg.eval)
    test = cached_evalset(paths.prepared, "test", cfg.eval)
    if saved:  # last, so nothing between here and the next step draws from the restored generator
        torch.set_rng_state(saved["torch_rng"])
    return _Run(towers, model, retriever, tokenizer, meta, opt, sched, autocast, device, dev, test, start, restored)


def _train(cfg: TrainConfig, paths: Paths, data: _Data, run: _Run, tags, term: dict) -> dict:
    rank, world = _ddp()
    ckpt_dir = paths.out / CHECKPOINT_DIR
    state = run.restored or {
        "step": 0, "config_key": cfg.key(), "shape": cfg.shape, "run_id": None, "history": [],
        "best_dev": float("inf"), "test_at_best_dev": float("inf"), "test_min": float("inf"),
        "best_step": 0, "step_seconds": [], "tokens": [], "data_key": data.key, "zero_shot": None,
    }
    resumed = state["step"] > 0
    mlflow = _start_mlflow(cfg, run.meta, len(data.queries), state, tags, rank, paths.out, run.start)
    best_test: dict = {}  # the best-dev model's test embeddings, reused by the final ranking metrics
    if rank == 0:
        state["run_id"] = mlflow.active_run().info.run_id if mlflow else None
    try:
        if mlflow:  # the data as MLflow datasets, digests = the content hashes above
            registry.log_training_data(paths, cfg.annotation_source, data.versions)
        if rank == 0 and state["zero_shot"] is None:  # where the run starts: the untouched model
            state["zero_shot"] = _zero_shot(run.retriever, run.dev, run.test, cfg, run.device, mlflow,
                                            data.versions["prepared_version"] + data.versions.get("tokenizer_version", ""))
        bar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                   desc=f"train {cfg.shape} D={len(data.queries)}", disable=rank != 0)
        for step in bar:
            loss = _step(cfg, data, run, step, state, world, rank)
            bar.set_postfix(loss=f"{loss:.3f}")
            if rank == 0 and mlflow:
                mlflow.log_metric("train_loss", loss, step=step + 1)
            last = step + 1 == cfg.steps
            if rank == 0 and ((step + 1) % cfg.eval_every == 0 or last):
                _evaluate_step(run.retriever, run.dev, run.test, cfg, state, paths, run.device, mlflow, best_test)
            if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or last or term["term"]):
                save_checkpoint(ckpt_dir, run.towers, run.opt, run.sched, state)
            if term["term"]:
                raise Terminated(f"SIGTERM at step {step + 1} of {cfg.steps}; checkpointed, a rerun resumes here")
        metrics = (_finish(cfg, paths, state, run, len(data.queries), mlflow, best_test, data.versions)
                   if rank == 0 else {})
    except BaseException as exc:
        if mlflow and rank == 0:
            mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if mlflow and rank == 0:
        mlflow.end_run()
    metrics["resumed"] = resumed
    return metrics


def _step(cfg: TrainConfig, data: _Data, run: _Run, step: int, state: dict, world: int, rank: int) -> float:
    """One training step of the run; records its time and tokens in `state`."""
    batch, negs = sample_step(step, cfg, len(data.queries), data.pos_idx, len(data.corpus))
    batch = np.array_split(batch, world)[rank]  # DDP: each rank a slice, same negatives
    t0 = time.perf_counter()
    run.model.train()
    q = tokenize(run.tokenizer, [data.queries[i] for i in batch], cfg.max_query_len)
    p = tokenize(run.tokenizer, [data.pos_texts[i] for i in batch] + data.corpus.texts(negs),
                 cfg.max_passage_len)
    loss = train_step(run.model, run.opt, run.sched, q, p, len(batch), cfg.in_batch_negatives, run.autocast,
                      run.device, cfg.max_grad_norm)
    state["step_seconds"].append(time.perf_counter() - t0)
    state["tokens"].append(int(q["attention_mask"].sum() + p["attention_mask"].sum()) * world)
    state["step"] = step + 1
    return loss.item()


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


_ZERO_SHOT: dict[str, dict[str, float]] = {}


def _zero_shot(retriever: Retriever, dev, test, cfg: TrainConfig, device: str, mlflow, data_key: str = "") -> dict[str, float]:
    """Dev and test CE before the first step (logged at step 0): every run must end below it. The
    untouched model does not depend on D or the annotation source, so a sweep evaluates each
    starting point once per process (keyed by everything the initial model and the evaluation use)."""
    start = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k in ("shape", "init", "towers", "dim", "scale", "pooling", "seed", "projection", "eval")}
    key = json.dumps([start, data_key], sort_keys=True)
    if key not in _ZERO_SHOT:
        fns = encode_fns(retriever, cfg.eval, device)
        _ZERO_SHOT[key] = {"ce_dev": embed_evalset(*fns, dev, cfg.eval).ce(), "ce_test": embed_evalset(*fns, test, cfg.eval).ce()}
    out = dict(_ZERO_SHOT[key])
    if mlflow:
        mlflow.log_metrics(out, step=0)
    return out


def convergence(history: list[dict], steps: int) -> float:
    """Relative improvement of the best test CE over the last quarter of training: (best up to 3/4 of
    the steps - best at the end) / best at the end. Small = the point has reached its plateau. NaN
    when no evaluation falls in the first three quarters (evaluate more often to measure it)."""
    before = [h["ce_test"] for h in history if 0 < h["step"] <= 0.75 * steps]
    if not before or not history:
        return float("nan")
    end = min(h["ce_test"] for h in history)
    return (min(before) - end) / end


RUN_FILE = "run.json"  # the MLflow run of the training in this folder, written as soon as it starts


def _start_mlflow(cfg: TrainConfig, meta: ModelMeta, d: int, state: dict, tags, rank: int, out: Path, start: Start):
    if rank != 0:
        return None
    tracking.configure()
    import mlflow

    nested = mlflow.active_run() is not None  # inside a sweep: a child of its parent run
    if not nested:
        tracking.use_experiment(tracking.experiment("train"))
    run_id = state.get("run_id") or _unfinished_run(out, cfg, state["data_key"])
    # config_key + data_key: how a sweep on another machine finds this run once it is FINISHED (executors.py).
    # Set when the run is created (one request), so a kill at any moment leaves a run its sweep can find.
    run_tags = {"drscaling.stage": "train", "shape": cfg.shape, "source": cfg.annotation_source, "towers": cfg.towers,
                "init_checkpoint": start.checkpoint, "n": str(meta.n_non_embedding), "d": str(d),
                "config_key": cfg.key(), "data_key": state["data_key"], **(tags or {})}
    if run_id:  # resume (or adopt the run of a process killed before its first checkpoint)
        run = mlflow.start_run(run_id=run_id, log_system_metrics=True, nested=nested)
        mlflow.set_tags(run_tags)  # an adopted run may have died before it had them; a retry's node is recorded
    else:
        run = mlflow.start_run(run_name=f"{cfg.shape}-D{d}-{cfg.annotation_source}", log_system_metrics=True,
                               nested=nested, tags=run_tags)
        write_json(out / RUN_FILE, {"run_id": run.info.run_id, "config_key": cfg.key()})
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval"}
    params |= {f"eval_{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}
    params |= {"n_non_embedding": meta.n_non_embedding, "d": d, "config_key": cfg.key(),
               "n_non_embedding_total": meta.n_non_embedding * (2 if cfg.towers == "dual" else 1),
               "git_commit": tracking.git_commit(), "data_version": tracking.data_version(),
               "device": _device(), "projection_init": meta.projection, **start.record()}
    logged = mlflow.get_run(run.info.run_id).data.params if run_id else {}
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})  # params are write-once in MLflow
    return mlflow


def _unfinished_run(out: Path, cfg: TrainConfig, data_key: str) -> str | None:
    """The MLflow run a killed process left for this folder and config, if it is not FINISHED: a rerun
    takes it over, so a kill before the first checkpoint leaves no run stuck in RUNNING. A run on other
    data is closed instead (FAILED, tagged `superseded`): adopting it would mix two data versions'
    metrics and dataset inputs in one run."""
    import mlflow

    file = out / RUN_FILE
    if not file.exists():
        return None
    info = read_json(file)
    if info.get("config_key") != cfg.key():
        return None
    try:
        run = mlflow.get_run(info["run_id"])
    except Exception:  # noqa: BLE001 - another tracking store, or a deleted run: start a new one
        return None
    if run.info.status == "FINISHED":
        return None
    if run.data.tags.get("data_key", data_key) != data_key:
        client = mlflow.MlflowClient()
        client.set_tag(run.info.run_id, "superseded", "trained on other data; a new run in the same folder"
                       " starts afresh on the current data")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
        return None
    return run.info.run_id


def _finish(cfg, paths, state, run: _Run, d, mlflow, best_test: dict, versions: dict[str, str]) -> dict:
    meta, device = run.meta, run.device
    # A resumed run may not hold the best model's test embeddings: then the ranking encodes them.
    best = load_retriever(paths.out / "model").to(device)
    test = load_split(paths.prepared, "test", relevance=True)
    ranks = rank_split(best, paths.prepared, test, cfg.eval, device, known=best_test.get("embedded")) if cfg.eval.rank_pool else {}
    secs = state["step_seconds"]
    zero = state.get("zero_shot") or {}
    conv = convergence(state["history"], cfg.steps)
    metrics = {
        "ce_dev_best": state["best_dev"], "ce_test_at_best_dev": state["test_at_best_dev"],
        "ce_test_min": state["test_min"], "best_step": state["best_step"], **ranks,
        "ce_test_zero_shot": zero.get("ce_test", float("nan")), "ce_dev_zero_shot": zero.get("ce_dev", float("nan")),
        "convergence": conv if np.isfinite(conv) else None, "converged": bool(conv <= CONVERGENCE_TOLERANCE),
        "train_step_seconds": statistics.median(secs) if secs else float("nan"),
        "train_tokens_per_step": float(np.mean(state["tokens"])) if state["tokens"] else 0.0,
    }
    result = {"shape": cfg.shape, "n": meta.n_non_embedding, "d": d, "source": cfg.annotation_source,
              "steps": cfg.steps, "config_key": cfg.key(), "data_key": state["data_key"], "run_id": state["run_id"],
              **run.start.record(),
              "history": state["history"], **metrics}
    if mlflow:
        mlflow.log_metrics(tracking.metric_names(metrics))
        # once, as an MLflow Model registered under its shape, with its model card (registry.py)
        registry.log_trained(paths.out / "model", result, meta, cfg.towers, versions, best_test.get("embedded"))
        mlflow.log_dict(state["history"], "history.json")
        mlflow.log_text(to_json(result), "metrics.json")  # the run's result as metrics.json holds it, for other machines
    write_json(paths.out / "metrics.json", result)  # last: its presence marks the run finished
    shutil.rmtree(paths.out / CHECKPOINT_DIR, ignore_errors=True)  # finished: metrics.json is the record
    return result
