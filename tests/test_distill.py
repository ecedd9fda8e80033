"""ScalingNote stage 2: a small query tower distilled from a trained large one (tiny shapes, real training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from drscaling.data import load_split
from drscaling.distill import DistillConfig, distill, distill_loss
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, build_evalset, contrastive_entropy
from drscaling.model.build import build_model
from drscaling.model.retriever import Retriever, Tower
from drscaling.model.saved import load_retriever, save_retriever
from drscaling.model.tokenizer import load_tokenizer, shape_tokenizer
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.run import train

EVAL = EvalConfig(negatives=64, draws=2, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=400)


def _paths(prepared, annotations, tokenizer_dir, out) -> Paths:
    return Paths(Path(prepared), Path(annotations), Path(tokenizer_dir), Path(out))


@pytest.fixture(scope="module")
def trained(prepared, annotations, tokenizer_dir, tmp_path_factory):
    """Dual pretrained towers (minilm-L2) and a small end-to-end model (minilm-L1) on the same data and steps."""
    root = tmp_path_factory.mktemp("distill")
    common = dict(steps=20, batch_size=16, negatives=24, max_query_len=16, max_passage_len=32, lr=1e-4,
                  warmup_steps=5, eval_every=20, checkpoint_every=20, dim=768, train_pairs=400, eval=EVAL)
    teacher = TrainConfig(shape="minilm-L2", towers="dual", **common)
    small = TrainConfig(shape="minilm-L1", **common)
    t = train(teacher, _paths(prepared, annotations, tokenizer_dir, root / "teacher"))
    s = train(small, _paths(prepared, annotations, tokenizer_dir, root / "small"))
    return root, t, s


def test_loss_is_zero_for_identical_embeddings_and_grows_with_disagreement():
    x = torch.randn(4, 8)
    assert distill_loss(x, x, 1.0)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(-x, x, 1.0)[0].item() > distill_loss(x + 0.1, x, 1.0)[0].item()


def test_distilled_query_tower_beside_teacher_and_end_to_end(trained, prepared, annotations, tokenizer_dir):
    root, teacher_metrics, _ = trained
    cfg = DistillConfig(student_shape="minilm-L1", train_pairs=400, steps=30, batch_size=32, lr=1e-3,
                        warmup_steps=5, max_query_len=16, eval=EVAL)
    out = root / "distilled"
    result = distill(cfg, root / "teacher", _paths(prepared, annotations, tokenizer_dir, out), baseline=root / "small")

    assert set(result) >= {"teacher", "distilled", "end_to_end", "distill"}
    assert result["teacher"]["ce"] == pytest.approx(teacher_metrics["ce_test_at_best_dev"], abs=1e-4)
    assert result["distilled"]["query_shape"] == "minilm-L1"
    assert result["distilled"]["passage_shape"] == "minilm-L2"
    assert result["distill"]["final_cosine"] > 0.5  # the student learned to point where the teacher does
    # the student's starting point (a fresh projection) against the teacher's passages is far worse
    tok = shape_tokenizer("minilm-L1", "", tokenizer_dir)
    start, meta = build_model("minilm-L1", tok, 768, seed=cfg.seed)
    big = load_retriever(root / "teacher/model")
    es = build_evalset(load_split(prepared, "test"), "test", EVAL)
    ce_start = contrastive_entropy(Retriever(Tower(start, tok, meta), big.passage), es, EVAL)
    assert result["distilled"]["ce"] < ce_start - 0.15, (result["distilled"]["ce"], ce_start)
    assert result["teacher"]["ce"] < 2.0  # a real teacher: log(65) = 4.17 is chance
    assert result["distilled"]["ce"] < result["teacher"]["ce"] + 0.5  # most of the teacher's quality kept

    model = load_retriever(out / "model")
    assert not model.shared and model.query.meta.shape == "minilm-L1"
    assert json.loads((out / "metrics.json").read_text())["distilled"]["ce"] == result["distilled"]["ce"]
    runs = mlflow.search_runs(experiment_names=["distill"], output_format="list")
    assert any("distilled_ce" in r.data.metrics and "end_to_end_ce" in r.data.metrics for r in runs)


def test_student_not_smaller_than_teacher_is_refused(trained, prepared, annotations, tokenizer_dir, tmp_path):
    root = trained[0]
    cfg = DistillConfig(student_shape="minilm-L3", steps=2, eval=EVAL)
    with pytest.raises(DrscalingError, match="not fewer than the teacher's query tower"):
        distill(cfg, root / "teacher", _paths(prepared, annotations, tokenizer_dir, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_untrained_teacher_is_refused(trained, prepared, annotations, tokenizer_dir, tmp_path):
    unfinished = tmp_path / "run"
    shutil.copytree(trained[0] / "teacher/model", unfinished / "model")  # a run folder without metrics.json
    with pytest.raises(DrscalingError, match="never finished training"):
        distill(DistillConfig(steps=2, eval=EVAL), unfinished, _paths(prepared, annotations, tokenizer_dir, tmp_path / "o"))
    with pytest.raises(DrscalingError, match="not a trained model"):
        distill(DistillConfig(steps=2, eval=EVAL), tmp_path / "nothing", _paths(prepared, annotations, tokenizer_dir, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_towers_with_different_embedding_dimensions_are_refused(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    q, qm = build_model("bert-L2-H128", tok, 32)
    p, pm = build_model("bert-L2-H128", tok, 48)
    save_retriever(Retriever(Tower(q, tok, qm), Tower(p, tok, pm)), tmp_path / "model")
    with pytest.raises(DrscalingError, match="query tower embeds in 32 dimensions, the passage tower in 48"):
        load_retriever(tmp_path / "model")
