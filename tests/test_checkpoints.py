"""A checkpoint per shape: init templates filled per shape, checked before compute, recorded per run.

Tiny from-config checkpoints (the project's test tokenizer, save_pretrained) are laid out as the BERT
miniatures are on the hub (bert_uncased_L-{L}_H-{H}_A-{A}) under tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from drscaling.checkpoints import fill, init_for, resolve_start
from drscaling.errors import DrscalingError
from drscaling.evaluate import EvalConfig, evaluate_model
from drscaling.model.build import build_model
from drscaling.model.shapes import HUB_TEMPLATES, LLMS, parse_shape
from drscaling.model.tokenizer import load_tokenizer
from drscaling.sweep import load_preset, run_sweep
from drscaling.train.config import Paths, TrainConfig
from drscaling.train.run import train

EVAL = EvalConfig(negatives=64, draws=2, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=0)
TEMPLATE = "bert_uncased_L-{L}_H-{H}_A-{A}"
TRAIN = dict(steps=2, batch_size=8, negatives=16, max_query_len=16, max_passage_len=32, lr=1e-4, dim=128,
             eval_every=2, checkpoint_every=2, projection="identity")


def save_bert(folder: Path, shape: str, tokenizer_dir: Path, seed: int, as_shape: str | None = None) -> dict:
    """A from-config BERT of `shape` (or `as_shape`'s dimensions) saved as a HF folder with the
    project's test tokenizer; returns its state dict."""
    from transformers import BertConfig, BertModel

    s = parse_shape(as_shape or shape)
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=s.hidden, num_hidden_layers=s.layers,
                                 num_attention_heads=s.heads, intermediate_size=s.intermediate,
                                 max_position_embeddings=128, pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def weights_md5(folder: Path) -> str:
    """What a run must record: md5 over the weight files' names and bytes (here one safetensors file)."""
    h = hashlib.md5()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("models")
    saved = {shape: save_bert(root / fill(TEMPLATE, shape), shape, tokenizer_dir, seed)
             for seed, shape in enumerate(("bert-L2-H128", "bert-L4-H128"))}
    return root, saved


def paths(prepared, annotations, tokenizer_dir, out) -> Paths:
    return Paths(Path(prepared), Path(annotations), Path(tokenizer_dir), Path(out))


def write_preset(path: Path, shapes: list[str], init: str | dict) -> Path:
    preset = {"name": path.stem, "train": TRAIN | {"init": init, "eval": vars(EVAL)},
              "model": {"shapes": shapes, "train_pairs": 64}}
    path.write_text(yaml.safe_dump(preset))
    return path


def test_each_shape_of_a_sweep_starts_from_its_own_checkpoint(prepared, annotations, tokenizer_dir, models, tmp_path):
    root, saved = models
    shapes = ["bert-L2-H128", "bert-L4-H128"]
    preset = load_preset(str(write_preset(tmp_path / "per-shape.yaml", shapes, str(root / TEMPLATE))))
    out = tmp_path / "sweep"
    rows = {r["shape"]: r for r in _rows(run_sweep(preset, paths(prepared, annotations, tokenizer_dir, out), {}, out))}
    for shape in shapes:
        folder = root / fill(TEMPLATE, shape)
        row = rows[shape]
        assert row["init_checkpoint"] == str(folder) and row["init_hash"] == weights_md5(folder)
        # step 0 is the checkpoint itself: the run's zero-shot CE is the saved folder's CE as a plain
        # encoder (the identity head adds nothing), and the other shape's checkpoint scores differently
        alone = evaluate_model(folder, prepared, "test", EVAL)["ce"]
        assert row["ce_test_zero_shot"] == pytest.approx(alone, abs=1e-4), shape
        run = mlflow.get_run(_run_id(out, row["config_key"]))
        assert run.data.params["init_checkpoint"] == str(folder) and run.data.params["init_hash"] == row["init_hash"]
        assert run.data.params["init"] == str(root / TEMPLATE) and run.data.tags["init_checkpoint"] == str(folder)
    assert rows["bert-L2-H128"]["init_hash"] != rows["bert-L4-H128"]["init_hash"]
    assert rows["bert-L2-H128"]["ce_test_zero_shot"] != pytest.approx(rows["bert-L4-H128"]["ce_test_zero_shot"], abs=1e-3)


def test_the_built_towers_hold_the_saved_weights(tokenizer_dir, models):
    """What training starts from, tensor by tensor: the shape's own checkpoint, not the other's."""
    root, saved = models
    for shape, state in saved.items():
        start = resolve_start(shape, str(root / TEMPLATE))
        encoder, meta = build_model(shape, load_tokenizer(start.load), 128, init=start.load, projection="identity")
        got = encoder.backbone.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), shape


def test_a_missing_checkpoint_fails_before_the_first_point(prepared, annotations, tokenizer_dir, models, tmp_path):
    root, _ = models
    preset = load_preset(str(write_preset(tmp_path / "missing.yaml", ["bert-L2-H128", "bert-L6-H128"], str(root / TEMPLATE))))
    out = tmp_path / "sweep"
    missing = root / "bert_uncased_L-6_H-128_A-2"
    with pytest.raises(DrscalingError, match=f"folder {missing} does not exist"):
        run_sweep(preset, paths(prepared, annotations, tokenizer_dir, out), {}, out)
    assert not (out / "runs").exists()  # bert-L2-H128, cheaper and first in line, never started
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.preset = 'missing'")


def test_train_refuses_a_missing_or_misfitting_checkpoint(prepared, annotations, tokenizer_dir, models, tmp_path):
    root, _ = models
    p = paths(prepared, annotations, tokenizer_dir, tmp_path / "run")
    cfg = TrainConfig(shape="bert-L8-H128", init=str(root / TEMPLATE), eval=EVAL, **TRAIN)
    with pytest.raises(DrscalingError, match="bert_uncased_L-8_H-128_A-2"):
        train(cfg, p)
    assert not (tmp_path / "run").exists()
    save_bert(tmp_path / "bad" / "L-4", "bert-L4-H128", tokenizer_dir, 0, as_shape="bert-L2-H128")
    with pytest.raises(DrscalingError, match="has 2 layers of width 128, not 4 of 128"):
        resolve_start("bert-L4-H128", str(tmp_path / "bad" / "L-{L}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DrscalingError, match="not a model folder"):
        resolve_start("bert-L2-H128", str(tmp_path / "empty"))


def test_scratch_trains_from_config_as_the_default_does(prepared, annotations, tokenizer_dir, tmp_path):
    cfg = TrainConfig(shape="bert-L2-H128", init="scratch", eval=EVAL, **TRAIN)
    assert cfg.key() == TrainConfig(shape="bert-L2-H128", eval=EVAL, **TRAIN).key()  # same run as init ""
    m = train(cfg, paths(prepared, annotations, tokenizer_dir, tmp_path / "run"))
    assert m["init_checkpoint"] == "scratch" and m["init_hash"] == ""
    assert mlflow.get_run(m["run_id"]).data.params["init_checkpoint"] == "scratch"
    with pytest.raises(DrscalingError, match="builds BERT zoo shapes from config"):
        resolve_start("minilm-L1", "scratch")


@pytest.mark.parametrize(("init", "message"), [
    ("/models/bert_L-{layers}", r"unknown placeholder \{layers\} for shape bert-L2-H128 \(bert shapes have: "),
    ("/models/bert_{}", r"unknown placeholder \{\} for shape"),
    ("/models/bert_{L", "init template '/models/bert_{L'"),
])
def test_a_bad_template_is_a_clear_error(prepared, annotations, tokenizer_dir, tmp_path, init, message):
    preset = load_preset(str(write_preset(tmp_path / "bad.yaml", ["bert-L2-H128"], init)))
    with pytest.raises(DrscalingError, match=message):
        run_sweep(preset, paths(prepared, annotations, tokenizer_dir, tmp_path / "sweep"), {}, tmp_path / "sweep")
    assert not (tmp_path / "sweep" / "runs").exists()


def test_hub_ids_come_from_the_local_cache_offline(tokenizer_dir, tmp_path, monkeypatch):
    """A hub id resolves offline through huggingface_hub's own cache layout, records the id (not the
    machine's cache path), and is a clear error when it is not cached; nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--google--bert_uncased_L-2_H-128_A-2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    save_bert(snapshot, "bert-L2-H128", tokenizer_dir, 3)
    start = resolve_start("bert-L2-H128", HUB_TEMPLATES["bert"])
    assert start.checkpoint == "google/bert_uncased_L-2_H-128_A-2" and Path(start.load) == snapshot
    assert start.digest == weights_md5(snapshot)
    with pytest.raises(DrscalingError, match=r"google/bert_uncased_L-4_H-256_A-4 \(init template .*not in the local"
                                             r" Hugging Face cache and HF_HUB_OFFLINE=1"):
        resolve_start("bert-L4-H256", HUB_TEMPLATES["bert"])


def test_the_paper_preset_names_each_shapes_hub_checkpoint():
    from drscaling.sweep import points

    pts = {cfg.shape: cfg for _, cfg in points(load_preset("paper"), {})}
    assert pts["bert-L4-H256"].init == HUB_TEMPLATES["bert"]
    assert fill(pts["bert-L4-H256"].init, "bert-L4-H256") == parse_shape("bert-L4-H256").hub_name \
        == "google/bert_uncased_L-4_H-256_A-4"
    assert fill(pts["smollm2-135m"].init, "smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # other presets and the default keep today's keys: init "" is not rewritten
    quick = points(load_preset("quick"), {})
    assert all(cfg.init == "" for _, cfg in quick)


def test_decoder_towers_take_the_same_mechanism(tmp_path, tokenizer_dir):
    from transformers import LlamaConfig, LlamaModel

    assert fill("HuggingFaceTB/SmolLM2-{size}-Instruct", "smollm2-360m") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert fill("/llms/{shape}-L{L}-H{H}-A{A}", "smollm2-1.7b") == "/llms/smollm2-1.7b-L24-H2048-A32"
    mapping = {"bert": "/bert/" + TEMPLATE, "smollm2": "/llm/{size}"}
    assert init_for(mapping, "smollm2-135m") == "/llm/{size}" and init_for(mapping, "minilm-L1") == ""
    with pytest.raises(DrscalingError, match="unknown shape family gpt"):
        init_for({"gpt": "x"}, "bert-L2-H128")
    with pytest.raises(DrscalingError, match="takes no init"):
        resolve_start("minilm-L2", "/models/{L}")
    with pytest.raises(DrscalingError, match="smollm2-360m has no offline weights"):
        resolve_start("smollm2-360m", "")
    assert set(LLMS) == {"smollm2-135m", "smollm2-360m", "smollm2-1.7b"}
    # a decoder checkpoint named by a plain folder: the tower is built from it, weights as saved
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    llama.save_pretrained(tmp_path / "tiny-llm")
    start = resolve_start("smollm2-135m", str(tmp_path / "tiny-llm"))
    assert start.checkpoint == str(tmp_path / "tiny-llm") and start.digest == weights_md5(tmp_path / "tiny-llm")
    encoder, meta = build_model("smollm2-135m", load_tokenizer(tokenizer_dir), 64, init=start.load)
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in encoder.backbone.state_dict().items())


def _rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _run_id(out: Path, key: str) -> str:
    import json

    return json.loads((out / "runs" / key / "metrics.json").read_text())["run_id"]
