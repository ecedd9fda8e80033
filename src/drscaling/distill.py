"""Query-tower distillation (ScalingNote, arXiv 2411.15766, stage 2).

Stage 1 trains dual towers both initialised from the same LLM (`drscaling train --towers dual
--shape smollm2-135m`). Stage 2, here, freezes them and trains a small query tower (any zoo or series
shape) to reproduce the large query tower's embeddings, with loss

    MSE(s(q), t(q)) + cosine_weight * (1 - cos(s(q), t(q)))

on the training queries. Passages keep the large passage tower (encoded offline, once); queries get
the small one (encoded online, per request). The result is a dual model folder: query/ = the
student, passage/ = the teacher's passage tower.

Evaluation puts three deployments side by side on the test split (contrastive entropy and ranking
metrics): the teacher pair, the distilled pair (student query tower + teacher passage tower), and,
when given, a small model trained end to end on the same data and steps.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from drscaling import registry, tracking
from drscaling.checkpoints import resolve_start
from drscaling.data import load_split
from drscaling.design import METRICS_FILE
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, Embedded, cached_evalset, embed_evalset, encode_fns, rank_split
from drscaling.files import atomic_path, finite_copy, to_json, write_json
from drscaling.model.build import build_model
from drscaling.model.encoder import check_lengths
from drscaling.model.retriever import Retriever, Tower
from drscaling.model.saved import META_FILE, TOWERS_FILE, load_retriever, save_retriever
from drscaling.model.shapes import check_shape
from drscaling.model.tokenizer import shape_tokenizer, tokenize
from drscaling.train.config import Paths, Schedule
from drscaling.train.data import training_pairs
from drscaling.train.step import optimizer


@dataclass
class DistillConfig(Schedule):
    # Schedule's defaults where distillation differs (a redeclared field keeps its place in the order)
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 10
    student_shape: str = "minilm-L1"
    student_init: str = ""  # as TrainConfig.init: "" = the shape's own checkpoint or config
    max_query_len: int = 32
    cosine_weight: float = 1.0
    compress: bool = True  # refuse a student that is not smaller than the teacher's query tower
    projection: str = "identity"  # the student's head starts as [I; 0]: a pretrained student then starts in
    # the teacher's space when the teacher's head also started there (train's default), as in training
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)


def trained_folder(path: str | Path, role: str) -> Path:
    """A trained model's folder: a finished training run folder (its model/) or a model folder."""
    given = Path(path)
    path = given
    if (path / "model").is_dir() and not (path / META_FILE).exists() and not (path / TOWERS_FILE).exists():
        if not (path / METRICS_FILE).exists():
            raise DrscalingError(f"{role} {path} never finished training (no metrics.json): run `drscaling train` to the end first")
        path = path / "model"
    if not (path / TOWERS_FILE).exists() and not (path / META_FILE).exists():
        raise DrscalingError(
            f"{role} {given} is not a trained model (no towers.json or drscaling.json):"
            " train it first, e.g. `drscaling train --towers dual --shape smollm2-135m`"
        )
    return path


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, cosine_weight: float) -> tuple[torch.Tensor, float, float]:
    """ScalingNote's query-tower loss; also returns its two parts for logging."""
    mse = F.mse_loss(student, teacher)
    cos = F.cosine_similarity(student, teacher, dim=-1).mean()
    return mse + cosine_weight * (1.0 - cos), mse.item(), cos.item()


def check(cfg: DistillConfig, teacher: Retriever, student_n: int) -> None:
    cfg.check_schedule()
    teacher_n = teacher.query.meta.n_non_embedding
    if cfg.compress and student_n >= teacher_n:
        raise DrscalingError(
            f"student {cfg.student_shape} has N = {student_n:,} non-embedding parameters, not fewer than the"
            f" teacher's query tower ({teacher.query.meta.shape}, N = {teacher_n:,}); pick a smaller shape"
            " or pass --compress false"
        )


def distill(cfg: DistillConfig, teacher: str | Path, paths: Paths, baseline: str | Path | None = None) -> dict:
    """Train the student query tower against the frozen teacher; write <out>/model and metrics.json."""
    check_shape(cfg.student_shape)
    teacher_dir = trained_folder(teacher, "teacher")
    big = load_retriever(teacher_dir)
    queries = training_pairs(paths, cfg.annotation_source, cfg.train_pairs, cfg.seed)[0]
    start = resolve_start(cfg.student_shape, cfg.student_init)
    tokenizer = shape_tokenizer(cfg.student_shape, start.load or "", paths.tokenizer)
    dim = big.query.meta.dim
    # Same dimension and the same normalisation as the teacher: the student must land in its space.
    student, meta = build_model(cfg.student_shape, tokenizer, dim, seed=cfg.seed, init=start.load,
                                scale=big.query.meta.scale, projection=cfg.projection)
    check(cfg, big, meta.n_non_embedding)
    check_lengths(meta, cfg.max_query_len, cfg.eval.max_query_len)
    meta.max_query_len = cfg.eval.max_query_len
    baseline_dir = trained_folder(baseline, "baseline") if baseline else None

    device = "cuda" if torch.cuda.is_available() else "cpu"
    big.to(device)
    # The frozen teacher's query embeddings are the targets: computed once, not per step.
    targets = torch.from_numpy(big.query.encode(queries, cfg.max_query_len, cfg.eval.batch_size, device,
                                                desc=f"teacher query embeddings ({len(queries)})"))
    student.to(device)
    opt, sched = optimizer(student, cfg.lr, cfg.weight_decay, cfg.warmup_steps)
    torch.manual_seed(cfg.seed)

    tracking.configure()
    import mlflow

    label = f"distill-{cfg.student_shape}-from-{big.query.meta.shape}"
    with tracking.stage_run("distill", label, {"drscaling.stage": "distill", "student": cfg.student_shape,
                                                "teacher": big.query.meta.shape}):
        mlflow.log_params({k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval"}
                          | {f"eval_{k}": v for k, v in dataclasses.asdict(cfg.eval).items()}
                          | {"teacher": str(teacher_dir), "teacher_query_n": big.query.meta.n_non_embedding,
                             "student_n": meta.n_non_embedding, "d": len(queries), "baseline": str(baseline_dir or "")})
        step_seconds = []
        bar = tqdm(range(cfg.steps), desc=f"distill {cfg.student_shape} <- {big.query.meta.shape}")
        for step in bar:
            rng = np.random.default_rng([cfg.seed, step])
            batch = rng.choice(len(queries), size=min(cfg.batch_size, len(queries)), replace=False)
            t0 = time.perf_counter()
            student.train()
            q = tokenize(tokenizer, [queries[i] for i in batch], cfg.max_query_len)
            out = student(q["input_ids"].to(device), q["attention_mask"].to(device))
            loss, mse, cos = distill_loss(out.float(), targets[batch].to(device), cfg.cosine_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_seconds.append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", cos=f"{cos:.3f}")
            mlflow.log_metrics({"distill_loss": loss.item(), "distill_mse": mse, "distill_cosine": cos}, step=step + 1)

        small = Retriever(Tower(student.eval(), tokenizer, meta), big.passage)
        result = compare(big, small, baseline_dir, paths.prepared, cfg.eval, device)
        result["teacher"] |= {"model": str(teacher_dir)} | training_record(teacher_dir)
        if baseline_dir is not None:
            result["end_to_end"] |= training_record(baseline_dir)
        # Distillation needs queries, not labelled pairs: no annotation of its own. The budget adds the
        # teacher's pairs and training time to the distilled deployment (the teacher is its prerequisite).
        result["distilled"]["pairs"] = 0
        result["distilled"]["model"] = str(paths.out / "model")
        result["distill"] = {"steps": cfg.steps, "d": len(queries), "final_loss": loss.item(), "final_cosine": cos,
                             "step_seconds": statistics.median(step_seconds)}
        for name in ("teacher", "distilled", "end_to_end"):
            if name in result:
                mlflow.log_metrics(tracking.metric_names({f"{name}_{k}": v for k, v in result[name].items()
                                                          if isinstance(v, float)}))
        with atomic_path(paths.out) as tmp:  # the model and the metrics appear together, or not at all
            tmp.mkdir(parents=True)
            save_retriever(small, tmp / "model", extra={"distilled_from": str(teacher_dir)})
            write_json(tmp / METRICS_FILE, finite_copy(result))  # strict JSON: a diverged CE as null
        mlflow.log_text(to_json(finite_copy(result)), "distill.json")
        # the deployment (student query tower + teacher passage tower), once, as a registered MLflow Model
        registry.log_encoder(paths.out / "model", registry.distilled_card(result, meta.dim, cfg.annotation_source))
    return result


def compare(teacher: Retriever, distilled: Retriever, baseline: Path | None, prepared: str | Path,
            cfg: EvalConfig, device: str) -> dict:
    """Test metrics of the deployments; the teacher's passage embeddings are computed once and
    reused for the distilled pair, which shares that tower."""
    es = cached_evalset(prepared, "test", cfg)
    split = load_split(prepared, "test", relevance=True)
    out: dict = {}
    teacher_q, teacher_p = encode_fns(teacher, cfg, device)
    big = embed_evalset(teacher_q, teacher_p, es, cfg)
    student_q = encode_fns(distilled, cfg, device)[0]
    small_q = student_q(es.queries, cfg.max_query_len)
    mixed = Embedded(small_q, big.passages, es)
    entries = [("teacher", teacher, big), ("distilled", distilled, mixed)]
    if baseline is not None:
        base = load_retriever(baseline).to(device)
        entries.append(("end_to_end", base, embed_evalset(*encode_fns(base, cfg, device), es, cfg)))
    teacher_passages: dict[str, np.ndarray] = {}  # the distilled pair ranks with the teacher's passage tower
    for name, retriever, embedded in entries:
        metrics = {"ce": embedded.ce()}
        if cfg.rank_pool:
            cache = teacher_passages if retriever.passage is teacher.passage else None
            metrics |= rank_split(retriever, prepared, split, cfg, device, known=embedded, passage_cache=cache)
        out[name] = {"query_shape": retriever.query.meta.shape, "passage_shape": retriever.passage.meta.shape,
                     "query_n": retriever.query.meta.n_non_embedding,
                     "passage_n": retriever.passage.meta.n_non_embedding, **metrics}
    if baseline is not None:
        out["end_to_end"]["model"] = str(baseline)
    return out


def training_record(model_dir: Path) -> dict:
    """What the budget needs of a trained model: its training time and pairs, from its run's metrics.json."""
    file = Path(model_dir).parent / METRICS_FILE
    if not file.exists():
        return {}
    m = json.loads(file.read_text())
    return {"train_seconds": m["steps"] * m["train_step_seconds"], "pairs": m["d"], "steps": m["steps"]}


def format_comparison(result: dict) -> str:
    lines = [f"{'deployment':12} {'query tower':14} {'N_q':>12} {'passage tower':14} {'N_p':>12} {'CE':>7} {'MRR@10':>7}"]
    for name in ("teacher", "distilled", "end_to_end"):
        r = result.get(name)
        if r:
            lines.append(f"{name:12} {r['query_shape']:14} {r['query_n']:>12,} {r['passage_shape']:14} "
                         f"{r['passage_n']:>12,} {r['ce']:>7.3f} {r.get('mrr@10', float('nan')):>7.3f}")
    return "\n".join(lines)

