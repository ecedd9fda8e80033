"""train(): one run, checked before any compute, built (towers, optimiser, evaluation sets, a restored
checkpoint), stepped, evaluated and checkpointed, then recorded. The output folder is locked for the run."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from drscaling import registry
from drscaling.checkpoints import Start, resolve_start
from drscaling.evaluate import cached_evalset
from drscaling.files import folder_lock, remove_stale_temporaries
from drscaling.model.build import build_model
from drscaling.model.encoder import ModelMeta, Towers, check_lengths
from drscaling.model.retriever import Retriever, Tower
from drscaling.model.tokenizer import shape_tokenizer, tokenize
from drscaling.signals import Terminated, sigterm_at_boundary
from drscaling.train.config import Paths, TrainConfig, check_config
from drscaling.train.data import TrainingData, training_data
from drscaling.train.evaluation import evaluate_step, zero_shot
from drscaling.tracking import end_run_with_cause
from drscaling.train.record import open_mlflow_run, record_result
from drscaling.train.resume import CHECKPOINT_DIR, finished, read_checkpoint, restore_checkpoint, save_checkpoint
from drscaling.train.step import default_device, optimizer, sample_step, train_step

def _ddp() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world


@dataclass
class Run:
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
    data = training_data(cfg, paths, start)  # clear errors first
    done = finished(paths.out, cfg, data.key)
    if done:
        return done | {"resumed": False, "cached": True}
    check_config(cfg, len(data.corpus))
    lock = folder_lock(paths.out, f"training {cfg.shape}") if rank == 0 else contextlib.nullcontext()
    with lock, sigterm_at_boundary() as term:
        if rank == 0:  # a checkpoint (or result) half-written by a killed process: never read, now removed
            remove_stale_temporaries(paths.out)
        if discard_checkpoint:
            shutil.rmtree(paths.out / CHECKPOINT_DIR, ignore_errors=True)
        saved = read_checkpoint(paths.out / CHECKPOINT_DIR, cfg, data.key)  # refused here: before any compute
        return _train(cfg, paths, data, _build_run(cfg, paths, start, saved), tags, term)


def _build_run(cfg: TrainConfig, paths: Paths, start: Start, saved: dict | None = None) -> Run:
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
    device = default_device()
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
    return Run(towers, model, retriever, tokenizer, meta, opt, sched, autocast, device, dev, test, start, restored)


def _train(cfg: TrainConfig, paths: Paths, data: TrainingData, run: Run, tags, term: dict) -> dict:
    rank, world = _ddp()
    ckpt_dir = paths.out / CHECKPOINT_DIR
    state = run.restored or {
        "step": 0, "config_key": cfg.key(), "shape": cfg.shape, "run_id": None, "history": [],
        "best_dev": float("inf"), "test_at_best_dev": float("inf"), "test_min": float("inf"),
        "best_step": 0, "step_seconds": [], "tokens": [], "data_key": data.key, "zero_shot": None,
    }
    resumed = state["step"] > 0
    mlflow = open_mlflow_run(cfg, run.meta, len(data.queries), state, tags, rank, paths.out, run.start)
    best_test: dict = {}  # the best-dev model's test embeddings, reused by the final ranking metrics
    if rank == 0:
        state["run_id"] = mlflow.active_run().info.run_id if mlflow else None
    try:
        if mlflow:  # the data as MLflow datasets, digests = the content hashes above
            registry.log_training_data(paths, cfg.annotation_source, data.versions)
        if rank == 0 and state["zero_shot"] is None:  # where the run starts: the untouched model
            state["zero_shot"] = zero_shot(run.retriever, run.dev, run.test, cfg, run.device, mlflow,
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
                evaluate_step(run.retriever, run.dev, run.test, cfg, state, paths, run.device, mlflow, best_test)
            if rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or last or term["term"]):
                save_checkpoint(ckpt_dir, run.towers, run.opt, run.sched, state)
            if term["term"]:
                raise Terminated(f"SIGTERM at step {step + 1} of {cfg.steps}; checkpointed, a rerun resumes here")
        metrics = (record_result(cfg, paths, state, run.meta, run.start, run.device, len(data.queries), mlflow,
                                 best_test, data.versions) if rank == 0 else {})
    except BaseException as exc:
        if mlflow and rank == 0:
            end_run_with_cause(mlflow, exc)
        raise
    if mlflow and rank == 0:
        mlflow.end_run()
    metrics["resumed"] = resumed
    return metrics


def _step(cfg: TrainConfig, data: TrainingData, run: Run, step: int, state: dict, world: int, rank: int) -> float:
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
