"""Stages DVC caches must be pure functions of their inputs: the same input gives the same bytes, so a
second `dvc repro` (or a fresh clone's) finds nothing changed downstream."""

from __future__ import annotations

import string

from drscaling.data import load_split
from drscaling.model.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from drscaling.validate import validate_dataset


def test_tokenizer_is_deterministic_given_its_texts(prepared, tmp_path):
    train = load_split(prepared, "train")
    texts = list(train.corpus["text"]) + list(train.queries["text"])
    a = (train_tokenizer(texts, 2000, tmp_path / "a"), tmp_path / "a" / "tokenizer.json")
    b = (train_tokenizer(texts, 2000, tmp_path / "b"), tmp_path / "b" / "tokenizer.json")
    assert a[1].read_bytes() == b[1].read_bytes()
    tok = load_tokenizer(tmp_path / "a")
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == SPECIAL_TOKENS
    ids = tok("rsync copies files over ssh")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and tok.unk_token_id not in ids[1:-1]


def test_tokenizer_breaks_ties_the_same_way_every_time(tmp_path):
    """Every two-letter word once: all 676 pairs are equally frequent, so every merge is a tie. A
    trainer left to break ties in hash order gave 20 different vocabularies in 20 runs on this corpus."""
    letters = string.ascii_lowercase
    texts = [" ".join(a + b for b in letters) for a in letters]
    files = set()
    for i in range(5):
        train_tokenizer(texts, 100, tmp_path / str(i))
        files.add((tmp_path / str(i) / "tokenizer.json").read_bytes())
    assert len(files) == 1
    vocab = load_tokenizer(tmp_path / "0").get_vocab()
    assert len(vocab) == 100 and all(f"##{c}" in vocab for c in letters)  # the inner letters, as before


def test_validation_report_holds_no_timestamps_or_run_ids(prepared, tmp_path):
    validate_dataset(prepared, tmp_path / "a.json")
    validate_dataset(prepared, tmp_path / "b.json")
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text()
    for volatile in ("run_time", "validation_time", "ge_load_time", "validation_id"):
        assert f'"{volatile}"' not in text


def test_export_is_a_pure_function_of_the_model(tiny_model, tiny_onnx, tmp_path):
    """The export stage's outputs are DVC-cached: exporting the same model again gives the same bytes
    (timings go to MLflow, not export.json)."""
    from drscaling.export import export_onnx

    again = tmp_path / "again"
    export_onnx(tiny_model, again, variants=("fp32", "opt", "int8"))
    first = {p.relative_to(tiny_onnx): p.read_bytes() for p in sorted(tiny_onnx.rglob("*")) if p.is_file()}
    second = {p.relative_to(again): p.read_bytes() for p in sorted(again.rglob("*")) if p.is_file()}
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert "seconds" not in (again / "export.json").read_text()


_GEMMS = """
import hashlib, os, sys
import torch
{first}
torch.manual_seed(0)
h = hashlib.md5()
for m, k, n in [(32, 128, 512), (2048, 128, 128), (64, 768, 3072), (33, 100, 77)]:
    h.update((torch.randn(m, k) @ torch.randn(k, n)).numpy().tobytes())
print(os.environ.get("MKL_CBWR"), h.hexdigest())
"""


def _gemms(first: str, **env: str) -> list[str]:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | env
    out = subprocess.run([sys.executable, "-c", _GEMMS.format(first=first)], env=clean, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_importing_drscaling_pins_mkl_to_one_code_branch():
    """The sweeps' output bytes (dvc.lock) must not depend on the CPU's maker: drscaling pins MKL's AVX2
    branch before torch's first GEMM, even when torch was imported first, and keeps a user's own choice."""
    pinned = _gemms("import drscaling")
    assert pinned == _gemms("", MKL_CBWR="AVX2")
    assert pinned[0] == "AVX2"
    # The setting takes effect: the SSE2 branch (COMPATIBLE) sums differently on every x86 CPU.
    compatible = _gemms("import drscaling", MKL_CBWR="COMPATIBLE")
    assert compatible[0] == "COMPATIBLE" and compatible[1] != pinned[1]
