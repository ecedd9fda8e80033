"""`drscaling --help`: every flag says what it does, and a flag that reads params.yaml shows params.yaml's
value as its default (not the code's fallback); library noise stays off unless --verbose."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drscaling.cli import build_parser

def parsers(parser: argparse.ArgumentParser, path: str = "drscaling"):
    """(command path, parser) of the program and every sub-command, nested ones included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def flags(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def flag_entry(help_text: str, flag: str) -> str:
    """A flag's entry in --help output (its invocation and help text), whitespace collapsed."""
    m = re.search(rf"\n  {re.escape(flag)}[ ,\n](.*?)(?=\n  -|\Z)", help_text, re.DOTALL)
    assert m, f"{flag} not in the help"
    return " ".join(m[0].split())


def test_every_flag_has_help():
    missing = [f"{path} {a.option_strings[0]}" for path, p in parsers(build_parser()) for a in flags(p)
               if not (a.help or "").strip() or a.help == argparse.SUPPRESS]
    assert not missing, "flags without help: " + ", ".join(missing)


# Values no code fallback has: if --help printed the fallback, these would not appear.
ODD = {"data": {"prepared": "odd/prepared", "raw": "odd/raw.jsonl", "dev_size": 321, "test_size": 322, "seed": 77},
       "tokenizer": {"vocab_size": 4321},
       "train": {"lr": 0.000123, "steps": 777, "shape": "minilm-L3", "eval": {"negatives": 99}},
       "distill": {"steps": 555},
       "sweep": {"preset": "oddpreset", "executor": "ray", "ray": {"address": "10.0.0.9:6379"}},
       "fit": {"n_bootstrap": 1234, "workers": 3, "bootstrap_method": "pairs", "sources": ["human", "ict"]},
       "budget": {"budget": 12345, "include_inference": False, "costs": "paper", "costs_path": "odd/costs.json",
                  "source": "ict", "extrapolation_factor": 7,
                  "measured": {"steps": 4444, "corpus_pages": 5555, "tokens_per_page": 66}},
       "serving": {"variants": ["fp16"]},
       "measure": {"repeats": 9}}


def _value(key: str):
    value = ODD
    for part in key.split("."):
        value = value[part]
    return value


def test_help_shows_params_yaml_values(tmp_path, monkeypatch):
    from drscaling import params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(ODD))
    monkeypatch.chdir(tmp_path)  # params.yaml of the working folder governs, as under `dvc repro`
    monkeypatch.setenv("COLUMNS", "2000")  # one line per flag: no wrapping inside the text looked for
    checked, wrong = set(), []
    for path, p in parsers(build_parser()):
        help_text = p.format_help()
        for a in flags(p):
            key = getattr(a, "params_key", None)
            if key is None:
                continue
            try:
                shown = params.show(_value(key))
            except KeyError:  # a key this test's params.yaml leaves out
                continue
            checked.add(key)
            entry = flag_entry(help_text, a.option_strings[0])
            if f"default: {shown}, from params.yaml {key}" not in entry:
                wrong.append(f"{path} {a.option_strings[0]}: {entry!r}")
    assert not wrong, "help without params.yaml's value:\n" + "\n".join(wrong)
    # every params.yaml key above is read by some flag, so none of them was skipped by mistake
    expected = {"data.prepared", "data.raw", "data.dev_size", "data.test_size", "data.seed", "tokenizer.vocab_size",
                "train.lr", "train.steps", "train.shape", "train.eval.negatives", "distill.steps", "sweep.preset",
                "sweep.executor", "sweep.ray.address", "fit.n_bootstrap", "fit.workers", "fit.bootstrap_method",
                "fit.sources", "budget.budget", "budget.include_inference", "budget.costs", "budget.costs_path",
                "budget.source", "budget.extrapolation_factor", "budget.measured.steps", "budget.measured.corpus_pages",
                "budget.measured.tokens_per_page", "serving.variants", "measure.repeats"}
    assert expected <= checked, f"not shown by any flag: {sorted(expected - checked)}"


def test_help_without_the_key_shows_the_fallback(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"budget": {"costs": "measured"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "2000")
    text = dict(parsers(build_parser()))["drscaling budget"].format_help()
    assert "default: 20000; params.yaml budget.budget is not set" in text
    assert "default: measured, from params.yaml budget.costs" in text


def test_inherited_fields_keep_their_notes(tmp_path, monkeypatch):
    # train and distill share their schedule fields (train.config.Schedule): each command's --help
    # still explains them, and distill's own defaults (not training's) show where params.yaml is silent.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "2000")
    helps = dict(parsers(build_parser()))
    for command in ("drscaling train", "drscaling distill"):
        text = helps[command].format_help()
        assert "--train-pairs TRAIN_PAIRS D: the first D pairs" in " ".join(text.split()), command
    distill = " ".join(helps["drscaling distill"].format_help().split())
    assert "--steps STEPS steps (default: 100)" in distill and "--lr LR lr (default: 0.0001)" in distill


def _hf_encoder(folder: Path) -> Path:
    """A plain Hugging Face BERT folder saved with its pooler: drscaling loads it without one, so
    transformers reports the pooler's weights as unexpected (its LOAD REPORT table)."""
    from transformers import BertConfig, BertModel

    from drscaling.model.tokenizer import train_tokenizer

    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    train_tokenizer([f"passage {i} about package {i % 7}" for i in range(200)], 200, folder)  # makes the folder anew
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("verbose", [False, True])
def test_library_noise_only_with_verbose(prepared, tmp_path, verbose):
    """transformers' LOAD REPORT table and MLflow's INFO lines (a new store's set-up) show only with
    --verbose; drscaling's own output shows either way."""
    model = _hf_encoder(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "MLFLOW_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'fresh.db'}"
    args = ["evaluate", "--model", str(model), "--prepared", str(prepared), "--negatives", "8", "--draws", "1",
            "--rank-pool", "0", "--max-query-len", "16", "--max-passage-len", "32"]
    proc = subprocess.run([sys.executable, "-m", "drscaling", *(["--verbose"] if verbose else []), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"ce"' in proc.stdout  # the result itself
    assert ("LOAD REPORT" in proc.stderr) == verbose, proc.stderr[-3000:]
    assert ("INFO mlflow" in proc.stderr) == verbose, proc.stderr[-3000:]
