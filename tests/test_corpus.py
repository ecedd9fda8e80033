"""The lean corpus reader (data.Corpus): the same passages, pids and evaluation sets as the frames
load_split reads, texts read from the file only when asked for, and the same errors for bad files."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

from drscaling.data import SPLITS, Corpus, Split, Texts, load_split, read_corpus
from drscaling.errors import DrscalingError
from drscaling.files import write_jsonl
from drscaling.evaluate import EvalConfig, build_evalset, rank_pool

EVAL = EvalConfig(negatives=32, draws=3, max_query_len=16, max_passage_len=32, batch_size=64, rank_pool=0)


@pytest.mark.parametrize("split", SPLITS)
def test_a_lean_corpus_holds_what_the_frame_holds(prepared, split):
    frame = load_split(prepared, split).corpus
    lean = load_split(prepared, split, lean=True).corpus
    assert isinstance(lean, Corpus) and lean._texts is None  # read from the file, not kept in memory
    assert lean.frame().equals(frame)  # every pid and text, in order, typed as load_split types them
    assert lean.pid_list() == list(frame["pid"])
    idx = np.random.default_rng(0).choice(len(frame), size=50, replace=False)  # any order
    assert lean.texts(idx) == [frame["text"].iloc[i] for i in idx]
    assert lean.index_of(list(frame["pid"].iloc[idx]) + ["no such pid"]).tolist() == [*idx.tolist(), -1]


def test_evaluation_sets_from_a_lean_corpus_equal_those_from_the_frame(prepared, tmp_path):
    frame, lean = load_split(prepared, "test"), load_split(prepared, "test", lean=True)
    train = load_split(prepared, "train")
    extra = train.corpus[~train.corpus["pid"].isin(set(frame.corpus["pid"]))].head(900)
    wide = Split(pd.concat([frame.corpus, extra], ignore_index=True), frame.queries, frame.qrels)
    for cfg, a, b in [(EVAL, frame, lean), (dataclasses.replace(EVAL, negative_pool=500), wide, None)]:
        if b is None:  # the wide corpus written as a file, read lean
            write_jsonl(tmp_path / "wide.jsonl", wide.corpus.to_dict("records"))
            b = Split(read_corpus(tmp_path / "wide.jsonl"), wide.queries, wide.qrels)
        x, y = build_evalset(a, "test", cfg), build_evalset(b, "test", cfg)
        assert isinstance(y.passages, Texts) and list(y.passages) == list(x.passages)
        assert y.pids == x.pids and y.queries == x.queries and y.qids == x.qids
        assert (y.positive == x.positive).all() and (y.negatives == x.negatives).all()


def test_the_rank_pool_of_a_lean_corpus_is_the_one_pandas_sampled(prepared, tmp_path):
    """rank_pool draws with numpy what DataFrame.sample drew before the corpus was read lean."""
    split = load_split(prepared, "train")
    split = Split(split.corpus, split.queries, split.qrels.head(50))
    lean = Split(load_split(prepared, "train", lean=True).corpus, split.queries, split.qrels)
    for size, seed in [(len(split.corpus) // 3, 1234), (len(split.corpus) - 1, 7)]:
        pool = split.corpus
        judged = pool["pid"].isin(set(split.qrels["pid"]))
        others = pool[~judged].sample(n=size - int(judged.sum()), random_state=seed)
        expected = pool[judged | pool.index.isin(others.index)].reset_index(drop=True)
        assert rank_pool(prepared, lean, size, seed).equals(expected)
        assert rank_pool(prepared, split, size, seed).equals(expected)


def write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_blank_lines_crlf_and_numeric_pids_read_as_read_jsonl_reads_them(tmp_path):
    rows = [{"pid": "a", "text": "first é"}, {"pid": "b", "text": "second\nline"}]
    lean = read_corpus(write(tmp_path / "c.jsonl", ["", json.dumps(rows[0]) + "\r", "   ", json.dumps(rows[1])]))
    assert lean._texts is None and lean.pid_list() == ["a", "b"] and lean.texts([1, 0]) == ["second\nline", "first é"]
    numeric = read_corpus(write(tmp_path / "n.jsonl", ['{"pid": 7, "text": "x"}']))
    assert numeric.pid_list() == ["7"] and numeric.texts([0]) == ["x"]  # as load_split's astype(str)


@pytest.mark.parametrize("lines, message", [
    (['{"pid": "a", "text": "x"}', '{"pid": "b"}'], "line 2 lacks the field"),
    (['{"pid": "a", "text": "x"}', "{not json"], "line 2 is not valid JSON"),
    (["[1, 2]"], "line 1 is not a JSON object"),
    ([""], "file is empty"),
])
def test_bad_corpus_files_fail_as_read_jsonl_fails(tmp_path, lines, message):
    with pytest.raises(DrscalingError, match=message):
        read_corpus(write(tmp_path / "corpus.jsonl", lines))


def test_a_corpus_file_changed_after_reading_is_refused(tmp_path):
    path = write(tmp_path / "corpus.jsonl", ['{"pid": "a", "text": "x"}', '{"pid": "b", "text": "y"}'])
    corpus = read_corpus(path)
    write(path, ['{"pid": "a", "text": "changed"}', '{"pid": "b", "text": "y"}'])
    os.utime(path, ns=(1, 1))
    with pytest.raises(DrscalingError, match="changed while it was in use"):
        corpus.texts([0])
