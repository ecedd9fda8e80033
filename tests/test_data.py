"""Canonical format, importers and the Great Expectations gate, with good and bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from conftest import write_lines

from drscaling.data import SPLITS, load_split
from drscaling.dataset.msmarco import import_msmarco
from drscaling.dataset.pairs import import_pairs
from drscaling.dataset.snapshot import prepare_debian
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl
from drscaling.validate import Bounds, validate_dataset

SMALL = Bounds(min_test_corpus=20)


def test_prepare_splits_by_source_without_leakage(raw_pairs, prepared):
    sources = {}
    for row in read_jsonl(raw_pairs):
        sources["p:" + row["package"]] = row["source"]
    seen: dict[str, str] = {}
    for split in SPLITS:
        s = load_split(prepared, split)
        for pid in s.corpus["pid"]:
            src = sources[pid]
            assert seen.setdefault(src, split) == split, f"source {src} in two splits"
    assert len(load_split(prepared, "test").qrels) >= 300
    assert len(load_split(prepared, "dev").qrels) >= 300


def test_prepare_is_deterministic(raw_pairs, tmp_path):
    prepare_debian(raw_pairs, tmp_path / "a", 300, 300, seed=13)
    prepare_debian(raw_pairs, tmp_path / "b", 300, 300, seed=13)
    for split in SPLITS:
        for f in ("corpus", "queries", "qrels"):
            assert (tmp_path / "a" / split / f"{f}.jsonl").read_bytes() == (tmp_path / "b" / split / f"{f}.jsonl").read_bytes()


def test_validate_passes_on_good_data(prepared, tmp_path):
    summary = validate_dataset(prepared, tmp_path / "report.json", SMALL)
    assert summary["success"]
    assert (tmp_path / "report.json").exists()


def _corrupt(prepared: Path, tmp_path: Path, split: str, name: str, edit) -> Path:
    copy = tmp_path / "bad"
    shutil.copytree(prepared, copy)
    path = copy / split / f"{name}.jsonl"
    rows = read_jsonl(path)
    write_lines(path, edit(rows))
    return copy


@pytest.mark.parametrize(
    ("split", "name", "edit", "expected"),
    [
        ("train", "corpus", lambda r: r + [r[0]], "expect_column_values_to_be_unique on column 'pid'"),
        ("test", "corpus", lambda r: [{**r[0], "text": "   "}] + r[1:], "expect_column_values_to_not_match_regex on column 'text'"),
        ("dev", "qrels", lambda r: r + [{"qid": r[0]["qid"], "pid": "p:does-not-exist"}], "pid_in_corpus"),
        ("test", "qrels", lambda r: [{"qid": x["qid"]} for x in r], "expect_table_columns_to_match_set"),
        ("test", "queries", lambda r: [{"qid": x["qid"], "query": x["text"]} for x in r], "expect_table_columns_to_match_set"),
    ],
    ids=["duplicate-pid", "empty-text", "qrel-unknown-pid", "missing-column-qrels", "missing-column-queries"],
)
def test_validate_rejects_bad_data(prepared, tmp_path, split, name, edit, expected):
    bad = _corrupt(prepared, tmp_path, split, name, edit)
    report = tmp_path / "report.json"
    with pytest.raises(DrscalingError) as err:
        validate_dataset(bad, report, SMALL)
    msg = str(err.value)
    assert expected in msg and f"{split}/{name}.jsonl" in msg, msg
    assert report.exists()  # the full GX result is written for inspection


def test_validate_catches_train_test_leakage(prepared, tmp_path):
    test_q = read_jsonl(prepared / "test" / "qrels.jsonl")[0]
    bad = _corrupt(prepared, tmp_path, "train", "qrels", lambda r: r + [test_q])
    with pytest.raises(DrscalingError, match="qid_not_in_train"):
        validate_dataset(bad, tmp_path / "r.json", SMALL)


def test_validate_expected_row_counts(prepared, tmp_path):
    with pytest.raises(DrscalingError, match="expect_table_row_count_to_be_between"):
        validate_dataset(prepared, tmp_path / "r.json", Bounds(min_test_corpus=100_000))


# ---------------------------------------------------------------------------------------------
# importers and malformed files
# ---------------------------------------------------------------------------------------------


def test_import_pairs_assigns_stable_ids(tmp_path, raw_pairs):
    rows = [{"query": r["query"], "passage": r["passage"]} for r in read_jsonl(raw_pairs)[:200]]
    src = write_lines(tmp_path / "pairs.jsonl", rows)
    counts = import_pairs(src, tmp_path / "a", 30, 30, seed=1)
    import_pairs(src, tmp_path / "b", 30, 30, seed=1)
    assert sum(counts.values()) == 200
    assert (tmp_path / "a/train/qrels.jsonl").read_text() == (tmp_path / "b/train/qrels.jsonl").read_text()
    validate_dataset(tmp_path / "a", tmp_path / "r.json", Bounds(min_test_corpus=20))


def test_import_pairs_bad_json_names_the_line(tmp_path):
    src = write_lines(tmp_path / "pairs.jsonl", [{"query": "a b", "passage": "some text here"}, "{not json", "{}"])
    with pytest.raises(DrscalingError, match="line 2 is not valid JSON"):
        import_pairs(src, tmp_path / "out", 1, 1, seed=1)
    assert not (tmp_path / "out").exists()


def test_import_pairs_empty_text_and_missing_field(tmp_path):
    src = write_lines(tmp_path / "p.jsonl", [{"query": "q", "passage": "p p p"}] * 3 + [{"query": " ", "passage": "x y z"}])
    with pytest.raises(DrscalingError, match="line 4 has an empty or non-string 'query'"):
        import_pairs(src, tmp_path / "out", 1, 1, seed=1)
    src = write_lines(tmp_path / "q.jsonl", [{"query": "q", "passage": "p"}, {"query": "only"}])
    with pytest.raises(DrscalingError, match="line 2 lacks the field"):
        import_pairs(src, tmp_path / "out", 1, 1, seed=1)
    assert not (tmp_path / "out").exists()


def test_empty_and_invalid_utf8_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DrscalingError, match="file is empty"):
        import_pairs(tmp_path / "empty.jsonl", tmp_path / "out", 1, 1, seed=1)
    (tmp_path / "bad.jsonl").write_bytes(b'{"query": "ok", "passage": "fine"}\n{"query": "\xff\xfe", "passage": "x"}\n')
    with pytest.raises(DrscalingError, match="invalid UTF-8"):
        import_pairs(tmp_path / "bad.jsonl", tmp_path / "out", 1, 1, seed=1)
    assert not (tmp_path / "out").exists()


def _msmarco(folder: Path, n: int = 40, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    coll = "".join(f"{i}\tpassage number {i} about topic {i % 7}\n" for i in range(n))
    files = {"collection.tsv": coll}
    for split, ids in {"train": range(0, 20), "dev": range(20, 30), "eval": range(30, 40)}.items():
        files[f"queries.{split}.tsv"] = "".join(f"{100 + i}\tquery about {i}\n" for i in ids)
        files[f"qrels.{split}.tsv"] = "".join(f"{100 + i}\t0\t{i}\t1\n" for i in ids)
    for name, text in files.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wt") as fh:
                fh.write(text)
        else:
            (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("gz", [False, True])
def test_import_msmarco(tmp_path, gz):
    src = _msmarco(tmp_path / "msmarco", gz=gz)
    counts = import_msmarco(src, tmp_path / "out")
    assert counts == {"train": 20, "dev": 10, "test": 10}
    test = load_split(tmp_path / "out", "test")
    assert set(test.qrels["pid"]) == {str(i) for i in range(30, 40)}
    # the shared collection is written once and linked
    assert (tmp_path / "out/train/corpus.jsonl").stat().st_ino == (tmp_path / "out/test/corpus.jsonl").stat().st_ino


def test_import_msmarco_truncated_gzip(tmp_path):
    src = _msmarco(tmp_path / "m", n=40, gz=True)
    data = (src / "collection.tsv.gz").read_bytes()
    (src / "collection.tsv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DrscalingError, match="corrupt or truncated gzip"):
        import_msmarco(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_msmarco_malformed_rows(tmp_path):
    src = _msmarco(tmp_path / "m")
    (src / "collection.tsv").write_text("0\tfine\n1 no tab here\n")
    with pytest.raises(DrscalingError, match="line 2 has 1 tab-separated field"):
        import_msmarco(src, tmp_path / "out")
    (src / "collection.tsv").unlink()
    with pytest.raises(DrscalingError, match="no collection.tsv"):
        import_msmarco(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_split_missing(tmp_path):
    with pytest.raises(DrscalingError, match="run `drscaling prepare` first"):
        load_split(tmp_path, "train")
