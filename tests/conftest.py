"""Shared fixtures: a small real slice of the embedded Debian snapshot, a tokenizer, an MLflow store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO / "data" / "debian" / "pairs.jsonl"


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every test talks to one real MLflow SQLite store in a temp folder, never the project's."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def raw_pairs(tmp_path_factory) -> Path:
    """The first 1,400 packages of the snapshot (restored by `dvc pull` in the test command)."""
    assert SNAPSHOT.exists(), f"{SNAPSHOT} missing: run `dvc pull` (the README's test command does)"
    out = tmp_path_factory.mktemp("raw") / "pairs.jsonl"
    with open(SNAPSHOT, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            if i >= 1400:
                break
            dst.write(line)
    return out


@pytest.fixture(scope="session")
def prepared(raw_pairs, tmp_path_factory) -> Path:
    from drscaling.data import prepare_debian

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_debian(raw_pairs, out, dev_size=300, test_size=300, seed=13)
    return out


@pytest.fixture(scope="session")
def annotations(prepared, tmp_path_factory) -> Path:
    from drscaling.annotate import annotate_human, annotate_ict

    folder = tmp_path_factory.mktemp("annotations")
    annotate_human(prepared, folder / "human.jsonl")
    annotate_ict(prepared, folder / "ict.jsonl", seed=0)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(prepared, tmp_path_factory) -> Path:
    from drscaling.data import load_split
    from drscaling.model import train_tokenizer

    train = load_split(prepared, "train")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(list(train.corpus["text"]) + list(train.queries["text"]), 2000, out)
    return out


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path
