"""Importers of outside formats: BEIR folders, ir_datasets ids, pairs files; sizes, de-duplication,
bad input, atomic writes, and property-based checks that any input gives a clear error or a valid dataset."""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import REPO, write_lines
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from drscaling.data import SPLITS, load_split
from drscaling.dataset import build as build_mod
from drscaling.dataset.beir import import_beir
from drscaling.dataset.irds import PIN, import_ir_datasets
from drscaling.dataset.msmarco import import_msmarco
from drscaling.dataset.pairs import import_pairs, stable_id
from drscaling.errors import DrscalingError
from drscaling.files import read_jsonl

DEFAULTS = {"dev": 1000, "test": 1000}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def check_dataset(root: Path, carved: bool = True) -> dict[str, dict[str, list[dict]]]:
    """The canonical format's structural rules (what `drscaling validate` checks, without GX's cost).
    `carved`: the importer split the data itself, so no dev/test judgement may touch train's (MS MARCO's
    files name their own splits, which the importer keeps as they are)."""
    data = {s: {f: read_jsonl(root / s / f"{f}.jsonl") for f in ("corpus", "queries", "qrels")} for s in SPLITS}
    assert sorted(p.name for p in root.iterdir()) == sorted(SPLITS)
    train_q = {r["qid"] for r in data["train"]["qrels"]}
    train_p = {r["pid"] for r in data["train"]["qrels"]}
    for split, files in data.items():
        pids = [r["pid"] for r in files["corpus"]]
        qids = [r["qid"] for r in files["queries"]]
        assert len(pids) == len(set(pids)) and len(qids) == len(set(qids)), split
        pairs = [(r["qid"], r["pid"]) for r in files["qrels"]]
        assert pairs and len(pairs) == len(set(pairs)), split
        assert {q for q, _ in pairs} == set(qids), split  # every query has a positive, none is dangling
        assert {p for _, p in pairs} <= set(pids), split
        for row in files["corpus"] + files["queries"]:
            assert isinstance(row["text"], str) and row["text"].strip()
            row["text"].encode("utf-8")
        for row in files["qrels"]:
            assert set(row) <= {"qid", "pid", "relevance"}
            assert row.get("relevance", 1) >= 1
        if carved and split != "train":
            assert not {q for q, _ in pairs} & train_q, f"{split} query in train"
            assert not {p for _, p in pairs} & train_p, f"{split} positive in train"
    return data


def nothing_left(parent: Path, dest: Path) -> bool:
    """No dataset and no temporary folder next to it."""
    return not dest.exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{dest.name}.")]


def beir_folder(root: Path, splits: dict[str, range], n_docs: int = 300, extra: dict[str, str] | None = None) -> Path:
    """A BEIR folder: docs d<i> (every third without a title), queries q<i>, graded qrels (score 1 + i % 3)
    plus one judged-non-relevant (score 0) row per query."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    write_lines(root / "corpus.jsonl", [
        {"_id": f"d{i}", "title": "" if i % 3 == 0 else f"Title {i}", "text": f"passage {i} on subject {i % 11} and more"}
        for i in range(n_docs)
    ])
    n_q = max(r.stop for r in splits.values())
    write_lines(root / "queries.jsonl", [{"_id": f"q{i}", "text": f"what about subject {i}"} for i in range(n_q)])
    for name, ids in splits.items():
        lines = ["query-id\tcorpus-id\tscore"]
        for i in ids:
            lines += [f"q{i}\td{i}\t{1 + i % 3}", f"q{i}\td{(i + 150) % n_docs}\t0"]
        (root / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n" + (extra or {}).get(name, ""))
    return root


# ---------------------------------------------------------------------------------------------
# BEIR
# ---------------------------------------------------------------------------------------------


def test_beir_graded_qrels_kept_and_validated(tmp_path):
    from drscaling.validate import Bounds, validate_dataset

    src = beir_folder(tmp_path / "beir", {"train": range(0, 60), "dev": range(60, 80), "test": range(80, 120)},
                      extra={"train": "q1\tnot-a-doc\t2\nq2\td2\t3\n"})
    report = import_beir(src, tmp_path / "out")
    assert dict(report) == {"train": 60, "dev": 20, "test": 40}
    data = check_dataset(tmp_path / "out")
    test = {(r["qid"], r["pid"]): r["relevance"] for r in data["test"]["qrels"]}
    assert test == {(f"q{i}", f"d{i}"): 1 + i % 3 for i in range(80, 120)}  # grades kept, score 0 dropped
    passages = {r["pid"]: r["text"] for r in data["test"]["corpus"]}
    assert passages["d1"] == "Title 1 passage 1 on subject 1 and more"  # title + " " + text, as BEIR
    assert passages["d3"] == "passage 3 on subject 3 and more"  # empty title: text alone, stripped
    # one corpus for every split, written once
    assert len({(tmp_path / "out" / s / "corpus.jsonl").stat().st_ino for s in SPLITS}) == 1
    msg = report.message()
    assert "dropped 40 judgement(s) with relevance <= 0" in msg and "dropped 60 judgement(s)" in msg
    assert "naming an unknown passage" in msg and "'not-a-doc'" in msg
    assert "merged 1 repeated" in msg  # q2 -> d2 judged twice: the higher grade stays
    assert {(r["qid"], r["pid"]): r["relevance"] for r in data["train"]["qrels"]}[("q2", "d2")] == 3
    assert list(load_split(tmp_path / "out", "test", relevance=True).qrels["relevance"])[:3] == [3, 1, 2]
    validate_dataset(tmp_path / "out", tmp_path / "report.json", Bounds(min_test_corpus=20))


def test_beir_missing_split_names_the_files_before_writing(tmp_path):
    src = beir_folder(tmp_path / "beir", {"train": range(0, 80), "test": range(80, 120)})
    with pytest.raises(DrscalingError) as err:
        import_beir(src, tmp_path / "out")
    msg = str(err.value)
    assert str(src) in msg and "no qrels/dev.tsv for the dev split" in msg
    assert "qrels/test.tsv, qrels/train.tsv" in msg and "--split dev=train" in msg
    assert nothing_left(tmp_path, tmp_path / "out")
    with pytest.raises(DrscalingError, match=r"no qrels/validation.tsv for the dev split"):
        import_beir(src, tmp_path / "out", mapping={"dev": "validation"})
    # the suggested mapping carves dev out of train, exactly, with no query or passage in both
    report = import_beir(src, tmp_path / "out", mapping={"dev": "train"}, dev_size=15, seed=3)
    assert dict(report) == {"train": 65, "dev": 15, "test": 40}
    assert "dev carved out of" in report.message()
    check_dataset(tmp_path / "out")


def test_beir_train_judgements_that_leak_into_test_are_dropped(tmp_path):
    # q5's positive d85 is also test query q85's positive: that train judgement goes, and is counted
    src = beir_folder(tmp_path / "beir", {"train": range(0, 60), "dev": range(60, 80), "test": range(80, 120)},
                      extra={"train": "q5\td85\t1\n"})
    report = import_beir(src, tmp_path / "out")
    assert report["train"] == 60
    assert "dropped 1 train judgement(s) whose query or passage is also judged in dev or test (e.g. q5 -> d85)" in report.message()
    check_dataset(tmp_path / "out")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: (d / "corpus.jsonl").write_bytes((d / "corpus.jsonl").read_bytes().replace(b"passage 6 ", b"passage \xff ", 1)),
         r"corpus.jsonl: line 7: invalid UTF-8 at byte"),
        (lambda d: (d / "queries.jsonl").write_text('{"_id": "q0", "text": "fine"}\n{"_id": "q1", "text": "bad \\ud800"}\n'),
         r"queries.jsonl: line 2: 'text' holds a lone surrogate \(\\ud800 at character 5\)"),
        (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq80\td80\t1\nq81\td81\n"),
         r"test.tsv: line 3 has 2 field\(s\), expected 3"),
        (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq80\td80\thigh\n"),
         r"test.tsv: line 2: score 'high' is not an integer"),
        (lambda d: (d / "corpus.jsonl").open("a").write('{"_id": "d4", "text": "another text"}\n'),
         r"corpus.jsonl: line 301: id 'd4' repeats .*corpus.jsonl: line 5 with a different text"),
        (lambda d: (d / "corpus.jsonl").open("a").write('["_id", "text"]\n'), r"line 301 is not a JSON object"),
        (lambda d: (d / "queries.jsonl").unlink(), r"not a BEIR folder: no queries.jsonl"),
    ],
    ids=["invalid-utf8", "lone-surrogate", "short-qrels-line", "bad-score", "conflicting-id", "not-object", "no-queries"],
)
def test_beir_bad_input_names_file_and_line(tmp_path, edit, expected):
    src = beir_folder(tmp_path / "beir", {"train": range(0, 60), "dev": range(60, 80), "test": range(80, 120)})
    edit(src)
    with pytest.raises(DrscalingError, match=expected):
        import_beir(src, tmp_path / "out")
    assert nothing_left(tmp_path, tmp_path / "out")


def test_wrong_format_is_named(tmp_path, raw_pairs):
    beir = beir_folder(tmp_path / "beir", {"train": range(0, 60), "dev": range(60, 80), "test": range(80, 120)})
    with pytest.raises(DrscalingError, match=r"is a folder; --format pairs .*looks like a BEIR folder.*use --format beir"):
        import_pairs(beir, tmp_path / "out", None, None, seed=1)
    with pytest.raises(DrscalingError, match=r"lacks the field\(s\) query, passage .*a file of a BEIR folder"):
        import_pairs(beir / "corpus.jsonl", tmp_path / "out", None, None, seed=1)
    with pytest.raises(DrscalingError, match=r"is a file; --format beir .*looks like JSON lines of \{query, passage\}"):
        import_beir(raw_pairs, tmp_path / "out")
    with pytest.raises(DrscalingError, match=r"no collection.tsv\(.gz\) found; it looks like a BEIR folder"):
        import_msmarco(beir, tmp_path / "out")
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "collection.tsv").write_text("0\tsome passage\n")
    with pytest.raises(DrscalingError, match=r"not a BEIR folder: no corpus.jsonl or queries.jsonl; it looks like MS MARCO"):
        import_beir(tmp_path / "ms", tmp_path / "out")
    assert nothing_left(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# ir_datasets, offline: local datasets built from ir_datasets' own classes, registered under an id, so
# the importer runs exactly as for a real id (ir_datasets.load, docs_iter, queries_iter, qrels_iter)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def irds(tmp_path, monkeypatch):
    # before the first import: importing ir_datasets creates its home folder's layout
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds-home"))
    return pytest.importorskip("ir_datasets")


def _tsv_dataset(ir_datasets, folder: Path, n_docs: int, qids: range, tag: str = ""):
    """msmarco-passage's shape: TSV docs and queries, TREC qrels (graded 1-2, plus score 0 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs, queries, qrels = folder / "docs.tsv", folder / f"queries{tag}.tsv", folder / f"qrels{tag}.txt"
    if not docs.exists():
        docs.write_text("".join(f"d{i}\tpassage {i} on subject {i % 11}\n" for i in range(n_docs)))
    queries.write_text("".join(f"q{i}\twhat about subject {i}\n" for i in qids))
    qrels.write_text("".join(f"q{i} 0 d{i} {1 + i % 2}\nq{i} 0 d{(i + 150) % n_docs} 0\n" for i in qids))
    return ir_datasets.create_dataset(docs_tsv=str(docs), queries_tsv=str(queries), qrels_trec=str(qrels))


def _register(ir_datasets, name: str, dataset) -> str:
    ir_datasets.registry.register(name, dataset)
    return name


def test_ir_datasets_id_with_qrels_is_carved(irds, tmp_path):
    did = _register(irds, f"drscaling-test-{uuid.uuid4().hex[:8]}/train", _tsv_dataset(irds, tmp_path / "ds", 300, range(150)))
    report = import_ir_datasets(did, tmp_path / "out", dev_size=20, test_size=30, seed=5)
    assert dict(report) == {"train": 100, "dev": 20, "test": 30}
    assert "dropped 150 judgement(s) with relevance <= 0" in report.message()
    data = check_dataset(tmp_path / "out")
    assert len(data["test"]["corpus"]) == 300  # the whole corpus is the negative pool
    assert {r["relevance"] for r in data["train"]["qrels"]} == {1, 2}
    text = {r["pid"]: r["text"] for r in data["dev"]["corpus"]}
    assert text["d7"] == "passage 7 on subject 7"


def test_ir_datasets_sub_datasets_map_to_splits(irds, tmp_path):
    base = f"drscaling-test-{uuid.uuid4().hex[:8]}"
    train = _tsv_dataset(irds, tmp_path / "ds", 300, range(0, 80), "-train")
    test = _tsv_dataset(irds, tmp_path / "ds", 300, range(80, 120), "-test")
    # like beir/scifact: the parent has docs and no qrels; its train and test sub-datasets have qrels
    _register(irds, base, irds.Dataset(train.docs_handler(), train.queries_handler()))
    _register(irds, f"{base}/train", train)
    _register(irds, f"{base}/test", test)
    with pytest.raises(DrscalingError) as err:
        import_ir_datasets(base, tmp_path / "out")
    msg = str(err.value)
    assert f"no {base}/dev for the dev split" in msg and f"{base}/test, {base}/train" in msg
    assert "--split dev=train" in msg and "nothing was written" in msg
    assert nothing_left(tmp_path, tmp_path / "out")
    report = import_ir_datasets(base, tmp_path / "out", mapping={"dev": "train"}, dev_size=10)
    assert dict(report) == {"train": 70, "dev": 10, "test": 40}
    check_dataset(tmp_path / "out")


def test_ir_datasets_unknown_or_unreachable_id(irds, tmp_path):
    with pytest.raises(DrscalingError, match=r"has no dataset 'msmarco-pasage/train'.*did you mean msmarco-passage/train"):
        import_ir_datasets("msmarco-pasage/train", tmp_path / "out")
    with pytest.raises(DrscalingError, match=r"has no dataset 'no-such-collection/x'.*nothing was written"):
        import_ir_datasets("no-such-collection/x", tmp_path / "out")
    # a registered id whose files cannot be fetched: what an offline machine sees for a real id
    missing = irds.create_dataset(docs_tsv=str(tmp_path / "gone" / "docs.tsv"), queries_tsv=str(tmp_path / "gone" / "q.tsv"),
                                  qrels_trec=str(tmp_path / "gone" / "qrels.txt"))
    did = _register(irds, f"drscaling-test-{uuid.uuid4().hex[:8]}/gone", missing)
    with pytest.raises(DrscalingError, match=r"could not read its qrels \(FileNotFoundError.*needs network access.*nothing was written"):
        import_ir_datasets(did, tmp_path / "out")
    assert nothing_left(tmp_path, tmp_path / "out")


def test_ir_datasets_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ir_datasets", None)  # import ir_datasets -> ImportError
    with pytest.raises(DrscalingError, match=re.escape(f"pip install {PIN}")):
        import_ir_datasets("msmarco-passage/train", tmp_path / "out")
    assert PIN in (REPO / "requirements.txt").read_text().splitlines()


# ---------------------------------------------------------------------------------------------
# pairs: sizes that fit, exact sizes after de-duplication, duplicates counted
# ---------------------------------------------------------------------------------------------


def test_small_pairs_file_imports_with_defaults_that_fit(tmp_path, raw_pairs):
    from drscaling.validate import Bounds, validate_dataset

    rows = [{"query": r["query"], "passage": r["passage"]} for r in read_jsonl(raw_pairs)[:1015]]
    src = write_lines(tmp_path / "pairs.jsonl", rows)
    report = import_pairs(src, tmp_path / "out", None, None, seed=13, defaults=DEFAULTS)
    assert dict(report) == {"train": 657, "dev": 101, "test": 257}
    msg = report.message()
    assert "1,015 unique pairs, too few for dev_size 1,000 + test_size 1,000" in msg
    assert "test=257 pairs (the larger of a fifth of the pairs (203) and 257" in msg
    assert "dev=101 pairs (a tenth of the pairs (101))" in msg and "--dev-size/--test-size" in msg
    check_dataset(tmp_path / "out")
    validate_dataset(tmp_path / "out", tmp_path / "report.json", Bounds())  # the default gate: 257 test passages
    # too small for any split with 256 negatives: the error says which flags to pass
    src = write_lines(tmp_path / "tiny.jsonl", rows[:200])
    with pytest.raises(DrscalingError, match=r"200 unique pairs over 200 passages .* pass both sizes \(e.g. --test-size 40 --dev-size 20\) and lower validate.min_test_corpus"):
        import_pairs(src, tmp_path / "tiny", None, None, seed=13, defaults=DEFAULTS)
    assert nothing_left(tmp_path, tmp_path / "tiny")


def test_split_sizes_are_exact_after_deduplication(tmp_path):
    rows = [{"query": f"query {i}", "passage": f"passage number {i} text"} for i in range(500)]
    rows += [{"query": f"another query {i}", "passage": f"passage number {i} text"} for i in range(0, 60, 3)]  # shared passages
    rows += [{"query": "query 7", "passage": "a second passage for query seven"}]  # a query with two passages
    rows += rows[:40]  # exact repeats
    rows += [{"query": f"same text {i}", "passage": f"same text {i}"} for i in range(5)]  # query == passage
    src = write_lines(tmp_path / "p.jsonl", rows)
    report = import_pairs(src, tmp_path / "out", dev_size=50, test_size=300, seed=1)
    assert report["test"] == 300 and report["dev"] == 50 and report["train"] == 521 - 350
    msg = report.message()
    assert "dropped 40 duplicate pair(s) (same query and passage as an earlier line; first at line 522)" in msg
    assert "dropped 5 pair(s) whose query equals its passage (first at line 562)" in msg
    data = check_dataset(tmp_path / "out")
    for split in SPLITS:  # ids are content hashes
        assert all(r["qid"] == stable_id("q", r["text"]) for r in data[split]["queries"])
        assert all(r["pid"] == stable_id("p", r["text"]) for r in data[split]["corpus"])
    with pytest.raises(DrscalingError, match=r"521 unique pairs \(after de-duplication\) are too few for dev_size 200 \+ test_size 400"):
        import_pairs(src, tmp_path / "big", dev_size=200, test_size=400, seed=1)


# ---------------------------------------------------------------------------------------------
# bad input and destinations
# ---------------------------------------------------------------------------------------------


def test_invalid_utf8_and_lone_surrogate_are_reported_on_their_line(tmp_path):
    good = [json.dumps({"query": f"q {i}", "passage": f"passage {i} text"}).encode() for i in range(7)]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(good + [b'{"query": "caf\xe9", "passage": "x y z"}']) + b"\n")
    with pytest.raises(DrscalingError, match=r"bad.jsonl: line 8: invalid UTF-8 at byte 15 of the line"):
        import_pairs(tmp_path / "bad.jsonl", tmp_path / "out", 1, 1, seed=1)
    lines = [json.dumps({"query": f"q {i}", "passage": f"passage {i} text"}) for i in range(2)]
    (tmp_path / "sur.jsonl").write_text("\n".join(lines + ['{"query": "ok", "passage": "half \\udc80 pair"}']) + "\n")
    with pytest.raises(DrscalingError, match=r"sur.jsonl: line 3: 'passage' holds a lone surrogate \(\\udc80 at character 6\)"):
        import_pairs(tmp_path / "sur.jsonl", tmp_path / "out", 1, 1, seed=1)
    assert nothing_left(tmp_path, tmp_path / "out")


def test_folders_and_gzip_problems_are_not_confused(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DrscalingError, match=r"dir.jsonl: is a folder; --format pairs"):
        import_pairs(tmp_path / "dir.jsonl", tmp_path / "out", 1, 1, seed=1)
    (tmp_path / "plain.jsonl.gz").write_text('{"query": "a b", "passage": "c d e"}\n')
    with pytest.raises(DrscalingError, match=r"named .gz but is not gzip-compressed"):
        import_pairs(tmp_path / "plain.jsonl.gz", tmp_path / "out", 1, 1, seed=1)
    data = gzip.compress(b"".join(json.dumps({"query": f"q{i}", "passage": f"p {i} x" * 50}).encode() + b"\n" for i in range(500)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DrscalingError, match=r"cut.jsonl.gz: corrupt or truncated gzip data after line \d+"):
        import_pairs(tmp_path / "cut.jsonl.gz", tmp_path / "out", 1, 1, seed=1)
    with pytest.raises(DrscalingError, match=r"pairs file not found: .*nope.jsonl"):
        import_pairs(tmp_path / "nope.jsonl", tmp_path / "out", 1, 1, seed=1)
    ms = tmp_path / "ms"
    (ms / "collection.tsv").mkdir(parents=True)
    with pytest.raises(DrscalingError, match=r"collection.tsv: is a folder, expected a TSV file"):
        import_msmarco(ms, tmp_path / "out")
    assert nothing_left(tmp_path, tmp_path / "out")


def _without_root_file_access() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set.
    A root process executed without them obeys file modes as any user does (its permitted set is
    bounded by this set at exec), so a mode-0 file is unreadable to it. A no-op for other users."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_file_and_unwritable_folder(tmp_path):
    """A real `import_pairs` in a process that file modes bind, also when the tests run as root (CI):
    a root child without the capabilities that bypass file modes."""
    src = write_lines(tmp_path / "p.jsonl", [{"query": "a b", "passage": "c d e"}])
    hidden = write_lines(tmp_path / "hidden.jsonl", [{"query": "a b", "passage": "c d e"}])
    hidden.chmod(0)
    (tmp_path / "ro").mkdir(mode=0o555)
    script = (
        "import sys\nfrom drscaling.dataset.pairs import import_pairs\nfrom drscaling.errors import DrscalingError\n"
        "for src, dest in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    try:\n        import_pairs(src, dest, 1, 1, seed=1)\n        print('imported')\n"
        "    except DrscalingError as exc:\n        print(exc)\n")
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    args = [str(hidden), str(tmp_path / "out"), str(src), str(tmp_path / "ro" / "out")]
    try:
        r = subprocess.run([sys.executable, "-c", script, *args],
                           env=env, capture_output=True, text=True, preexec_fn=_without_root_file_access, timeout=300)
    except subprocess.SubprocessError as exc:
        if "preexec_fn" not in str(exc):
            raise
        # prctl refused (a root without CAP_SETPCAP): no real way to make a file unreadable to it here
        pytest.skip(f"cannot start a root process without CAP_DAC_OVERRIDE here ({exc})")
    assert r.returncode == 0, r.stderr[-2000:]
    unreadable, unwritable = r.stdout.splitlines()
    assert re.search(r"hidden.jsonl: cannot be read \(permission denied\)", unreadable), unreadable
    assert re.search(r"cannot write to .*ro/out: .*ro is not writable", unwritable), unwritable
    assert not (tmp_path / "out").exists() and not (tmp_path / "ro" / "out").exists()


def _pairs(tmp_path: Path, n: int = 60) -> Path:
    return write_lines(tmp_path / "p.jsonl", [{"query": f"query {i}", "passage": f"passage {i} text"} for i in range(n)])


def test_destination_problems_are_clear_and_leave_nothing(tmp_path, monkeypatch):
    src = _pairs(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DrscalingError, match=r"cannot create .*afile/out: .*afile is a file, not a folder"):
        import_pairs(src, tmp_path / "afile" / "out", 5, 5, seed=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(DrscalingError, match=r"busy is not empty and is not a dataset folder \(it holds notes.txt\)"):
        import_pairs(src, tmp_path / "busy", 5, 5, seed=1)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    # an existing dataset is replaced only by a complete new one; a failed write keeps it as it was
    import_pairs(src, tmp_path / "deep" / "ds", 5, 5, seed=1)
    before = {p: p.read_bytes() for p in (tmp_path / "deep" / "ds").rglob("*.jsonl")}
    real = build_mod.save_dataset

    def disk_full(splits, dest):
        real({"train": splits["train"]}, dest)  # part of it, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_mod, "save_dataset", disk_full)
    with pytest.raises(DrscalingError, match=r"cannot write the dataset to .*ds: No space left on device; nothing was written"):
        import_pairs(src, tmp_path / "deep" / "ds", 6, 6, seed=1)
    assert {p: p.read_bytes() for p in (tmp_path / "deep" / "ds").rglob("*.jsonl")} == before
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["ds"]
    with pytest.raises(DrscalingError, match="No space left"):
        import_pairs(src, tmp_path / "new" / "a" / "b", 6, 6, seed=1)
    assert not (tmp_path / "new").exists()  # folders this import created are removed again


def test_cli_reports_without_traceback(tmp_path, capsys):
    from drscaling.cli import main

    beir = beir_folder(tmp_path / "beir", {"train": range(0, 80), "test": range(80, 120)})
    assert main(["data", "import", "--format", "pairs", str(beir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "use --format beir" in err and "Traceback" not in err
    assert main(["data", "import", "--format", "beir", str(beir), str(tmp_path / "out")]) == 2
    assert "no qrels/dev.tsv" in capsys.readouterr().err
    assert main(["data", "import", "--format", "beir", str(beir), str(tmp_path / "out"), "--split", "dev=train",
                 "--dev-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "train=72 pairs" in out and "dev=8 pairs" in out and "test=40 pairs" in out
    assert main(["data", "import", "--format", "pairs", str(_pairs(tmp_path)), str(tmp_path / "o2"), "--split", "dev=x"]) == 2
    assert "--split applies to --format beir and ir_datasets" in capsys.readouterr().err


def file_size_limit(nbytes: int):
    """A preexec_fn: the child may write no file past `nbytes` (as a full disk stops a write; Python
    ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["import", "prepare"])
def test_disk_full_ends_in_a_clear_message_and_keeps_the_old_dataset(stage, tmp_path, raw_pairs):
    """A write that runs out of room (RLIMIT_FSIZE in a real `drscaling` process) ends with one line
    naming the dataset, no traceback, the previous dataset untouched and no temporary folder left."""
    (tmp_path / "params.yaml").write_text("data: {dev_size: 100, test_size: 100, seed: 13}\n")  # prepare reads it
    dest = tmp_path / "out" / "dataset"
    cmd = [sys.executable, "-m", "drscaling", *{
        "import": ["data", "import", "--format", "pairs", "--dev-size", "100", "--test-size", "100", str(raw_pairs), str(dest)],
        "prepare": ["prepare", "--raw", str(raw_pairs), "--prepared", str(dest)]}[stage]]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    before = folder_bytes(dest)
    assert sum(map(len, before.values())) > 200_000  # so the limit below stops the rewrite mid-way
    full = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, preexec_fn=file_size_limit(100_000))
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert f"drscaling: error: could not write {dest}: File too large" in full.stderr
    assert folder_bytes(dest) == before
    assert [p.name for p in dest.parent.iterdir()] == ["dataset"]


# ---------------------------------------------------------------------------------------------
# properties: whatever the text, a clear DrscalingError or a valid dataset with stable, unique ids
# ---------------------------------------------------------------------------------------------

# Mostly ordinary texts, so valid datasets come out often; one draw in five is any text at all (any
# code point, lone surrogates included, white space, quotes, NUL, line separators), so duplicates, blanks,
# query == passage and undecodable lines all occur.
WILD = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
    st.sampled_from(["", " ", "\t", "a", "some words", "some words ", "é\u2028x", "\x00", '"', "\\"]),
)
WORDS = st.builds(" ".join, st.lists(st.text(st.sampled_from("abcdefghéü中"), min_size=1, max_size=6), min_size=1, max_size=4))


def mostly(usual, rare, odds: int = 4):
    """`rare` about one draw in odds + 1, else `usual` (a middle value picks `rare`: hypothesis favours
    the ends of a range, and its simplest example would otherwise always be the rare one)."""
    return st.integers(0, odds).flatmap(lambda i: rare if i == odds // 2 else usual)


TEXT = mostly(WORDS, WILD)
PROPS = settings(max_examples=60, deadline=None, database=None,  # no .hypothesis folder in the checkout
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _encode_line(obj: dict, ascii_only: bool) -> bytes:
    # ensure_ascii keeps lone surrogates as \ud800 escapes; without it they become invalid UTF-8 bytes
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", errors="surrogatepass")


JUNK = mostly(st.just([]), st.lists(st.tuples(st.integers(0, 30), st.binary(max_size=12)), min_size=1, max_size=2))


@PROPS
@given(
    pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=25),
    junk=JUNK,
    ascii_only=st.booleans(),
    sizes=st.sampled_from([(1, 1), (2, 1), (3, 2), (None, None), (1, None)]),
)
def test_property_pairs_any_text(pairs, junk, ascii_only, sizes):
    lines = [_encode_line({"query": q, "passage": p}, ascii_only) for q, p in pairs]
    for pos, raw in junk:
        lines.insert(min(pos, len(lines)), raw.replace(b"\n", b""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        outcomes = []
        for name in ("a", "b"):
            try:
                import_pairs(tmp / "p.jsonl", tmp / name, sizes[0], sizes[1], seed=7, defaults={"dev": 2, "test": 2})
                outcomes.append("ok")
            except DrscalingError as exc:
                assert str(exc) and "Traceback" not in str(exc)
                assert nothing_left(tmp, tmp / name)
                outcomes.append("error")
        event(outcomes[0])
        assert outcomes[0] == outcomes[1]
        if outcomes[0] == "ok":
            data = check_dataset(tmp / "a")
            for split in SPLITS:
                for f in ("corpus", "queries", "qrels"):  # stable: a re-import is byte-identical
                    assert (tmp / "a" / split / f"{f}.jsonl").read_bytes() == (tmp / "b" / split / f"{f}.jsonl").read_bytes()
                assert all(r["qid"] == stable_id("q", r["text"]) for r in data[split]["queries"])
                assert all(r["pid"] == stable_id("p", r["text"]) for r in data[split]["corpus"])


DOC_ID = mostly(st.one_of(st.sampled_from([f"d{i}" for i in range(16)]), st.integers(0, 3)), WILD, 150)
QUERY_ID = mostly(st.one_of(st.sampled_from([f"q{i}" for i in range(12)]), st.integers(0, 3)), WILD, 150)


@st.composite
def beir_case(draw):
    """Corpus and queries with unique ids (conflicting ids have their own test), and qrels files whose
    rows mostly name ids that exist, sometimes any id, with scores from -1 to 3."""
    docs = draw(st.lists(st.fixed_dictionaries({"_id": DOC_ID, "text": TEXT}, optional={"title": mostly(TEXT, st.none())}),
                         min_size=3, max_size=12, unique_by=lambda d: str(d["_id"])))
    queries = draw(st.lists(st.fixed_dictionaries({"_id": QUERY_ID, "text": TEXT}), min_size=3, max_size=8,
                            unique_by=lambda q: str(q["_id"])))
    score = mostly(st.integers(1, 3), st.integers(-1, 0), 2)
    names = sorted(draw(st.sets(st.sampled_from(SPLITS), min_size=1)))
    qrels = {}
    for k, name in enumerate(names):  # each file mostly judges its own share of the ids, sometimes any
        qids = [q["_id"] for i, q in enumerate(queries) if i % len(names) == k] or [queries[0]["_id"]]
        pids = [d["_id"] for i, d in enumerate(docs) if i % len(names) == k] or [docs[0]["_id"]]
        row = st.tuples(mostly(st.sampled_from(qids), QUERY_ID), mostly(st.sampled_from(pids), DOC_ID), score)
        qrels[name] = draw(st.lists(row, min_size=3, max_size=10))
    return docs, queries, qrels


@PROPS
@given(case=beir_case(), junk=mostly(st.none(), st.binary(max_size=10)), ascii_only=st.booleans())
def test_property_beir_any_text(case, junk, ascii_only):
    docs, queries, qrels = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "beir"
        (root / "qrels").mkdir(parents=True)
        (root / "corpus.jsonl").write_bytes(b"\n".join(_encode_line(d, ascii_only) for d in docs) + b"\n")
        (root / "queries.jsonl").write_bytes(b"\n".join(_encode_line(q, ascii_only) for q in queries) + b"\n")
        for name, rows in qrels.items():
            body = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t{s}\n" for q, p, s in rows)
            data = body.encode("utf-8", errors="surrogatepass")
            (root / "qrels" / f"{name}.tsv").write_bytes(data + (junk or b"") if name == "train" else data)
        mapping = {s: next(iter(qrels)) for s in SPLITS if s not in qrels}
        try:
            report = import_beir(root, Path(tmp) / "out", mapping=mapping, dev_size=1, test_size=1, seed=3)
        except DrscalingError as exc:
            assert str(exc)
            assert nothing_left(Path(tmp), Path(tmp) / "out")
            event("error")
            return
        event("ok")
        data = check_dataset(Path(tmp) / "out")
        assert dict(report) == {s: len(data[s]["qrels"]) for s in SPLITS}
        known = {str(d["_id"]) for d in docs}
        assert all(r["pid"] in known for s in SPLITS for r in data[s]["corpus"])  # BEIR ids kept as they are


MS_ID = mostly(st.sampled_from([str(i) for i in range(10)]), WILD, 20)


@st.composite
def msmarco_case(draw):
    """collection.tsv, queries.<split>.tsv and qrels.<split>.tsv (TREC or two-column) with ids that
    mostly exist, sometimes repeat or dangle, and texts of any kind (tabs and blanks included)."""
    line = st.tuples(MS_ID, TEXT).map(lambda t: f"{t[0]}\t{t[1]}")
    files = {"collection.tsv": draw(st.lists(line, min_size=1, max_size=10))}
    for split in ("train", "dev", "eval"):
        files[f"queries.{split}.tsv"] = draw(st.lists(line, min_size=1, max_size=6))
        trec = draw(st.booleans())
        judged = st.tuples(MS_ID, MS_ID, st.integers(-1, 2)).map(
            lambda t, trec=trec: f"{t[0]}\t0\t{t[1]}\t{t[2]}" if trec else f"{t[0]}\t{t[1]}")
        files[f"qrels.{split}.tsv"] = draw(st.lists(judged, min_size=1, max_size=8))
    return files


@PROPS
@given(case=msmarco_case(), junk=mostly(st.none(), st.binary(max_size=10)))
def test_property_msmarco_any_text(case, junk):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ms"
        src.mkdir()
        for name, lines in case.items():
            data = "\n".join(lines).encode("utf-8", errors="surrogatepass") + b"\n"
            (src / name).write_bytes(data + (junk or b"") if name == "collection.tsv" else data)
        outcomes = []
        for name in ("a", "b"):
            try:
                import_msmarco(src, Path(tmp) / name)
                outcomes.append("ok")
            except DrscalingError as exc:
                assert str(exc)
                assert nothing_left(Path(tmp), Path(tmp) / name)
                outcomes.append("error")
        event(outcomes[0])
        assert outcomes[0] == outcomes[1]
        if outcomes[0] == "ok":
            check_dataset(Path(tmp) / "a", carved=False)
            for split in SPLITS:  # stable: a re-import is byte-identical, ids included
                for f in ("corpus", "queries", "qrels"):
                    assert (Path(tmp) / "a" / split / f"{f}.jsonl").read_bytes() == (Path(tmp) / "b" / split / f"{f}.jsonl").read_bytes()


def test_msmarco_texts_keep_carriage_returns_and_repeats_are_counted(tmp_path):
    # Found by the property above: a bare \r inside a passage crashed the TSV reader (csv.Error).
    src = tmp_path / "ms"
    src.mkdir()
    (src / "collection.tsv").write_bytes(b"0\tfirst\rpassage\n1\tsecond passage\n1\tsecond passage\n2\t \n")
    for split in ("train", "dev", "eval"):
        (src / f"queries.{split}.tsv").write_text(f"q{split}\tquery of {split}\nq{split}\tquery of {split}\n")
    (src / "qrels.train.tsv").write_text("qtrain\t0\n")
    (src / "qrels.dev.tsv").write_text("qdev 0 1 1\nqdev 0 9 1\n")
    (src / "qrels.eval.tsv").write_text("qeval\t0\nqeval\t2\n")
    report = import_msmarco(src, tmp_path / "out")
    assert dict(report) == {"train": 1, "dev": 1, "test": 1}
    data = check_dataset(tmp_path / "out", carved=False)
    assert {r["pid"]: r["text"] for r in data["train"]["corpus"]} == {"0": "first\rpassage", "1": "second passage"}
    msg = report.message()
    assert "dropped 1 repeated entr(ies)" in msg and "dropped 1 entr(ies) with empty text (e.g. id '2')" in msg
    assert "qrels.dev.tsv: dropped 1 judgement(s) naming an unknown passage" in msg and "'9'" in msg
