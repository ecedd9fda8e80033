"""The canonical dataset: corpus, queries and qrels per split, as every importer writes and every stage reads it.

On disk a dataset is a folder with one sub-folder per split (train, dev, test), each holding
    corpus.jsonl   {"pid": str, "text": str}
    queries.jsonl  {"qid": str, "text": str}
    qrels.jsonl    {"qid": str, "pid": str[, "relevance": int]}
Each split's corpus holds the passages its queries may be scored against; the test corpus is also
the pool contrastive-entropy negatives are drawn from. Every qrels row is a relevant pair; importers of
graded judgements (BEIR, ir_datasets) keep the grade (> 0) in the optional `relevance` field and drop
judged-non-relevant rows. The importers (the Debian snapshot, MS MARCO, pairs, BEIR, ir_datasets) live in
drscaling.dataset, above this module.

A corpus of millions of passages is read lean (`load_split(..., lean=True)`, `Corpus`): its pids in
an Arrow array, each passage's place in corpus.jsonl, and texts read from the file only when asked for.
"""

from __future__ import annotations

import array
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, read_jsonl, write_jsonl

SPLITS = ("train", "dev", "test")
FILES = {"corpus": ("pid", "text"), "queries": ("qid", "text"), "qrels": ("qid", "pid")}
OPTIONAL = {"qrels": ("relevance",)}  # written when a split's frame has them


class Corpus:
    """Passages by index: pids in an Arrow array; texts from memory (`from_frame`) or read on demand
    from a corpus.jsonl by each line's byte span (`read_corpus`), so that 8.8M passages cost their pids
    and 12 bytes each instead of 8.8M Python strings."""

    def __init__(self, pids: pa.Array, texts: Sequence[str] | None = None, file: Path | None = None,
                 spans: np.ndarray | None = None):
        self.pids = pids
        self._texts = texts
        self._file = file
        self._spans = spans  # [n, 2] int64: (start, length) of each passage's line
        self._stamp = _stamp(file) if file is not None else None

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Corpus:
        return cls(pa.array(list(frame["pid"]), pa.string()), texts=list(frame["text"]))

    def __len__(self) -> int:
        return len(self.pids)

    def pid_list(self, idx: np.ndarray | None = None) -> list[str]:
        return (self.pids if idx is None else self.pids.take(np.asarray(idx, dtype=np.int64))).to_pylist()

    def index_of(self, pids: Sequence[str]) -> np.ndarray:
        """Each pid's index in the corpus (its first occurrence), -1 where absent."""
        found = pc.index_in(pa.array(list(pids), pa.string()), value_set=self.pids)
        return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)

    def contains(self, pids: Sequence[str]) -> np.ndarray:
        """[n] bool: which corpus passages have one of `pids`."""
        return pc.is_in(self.pids, value_set=pa.array(list(pids), pa.string())).to_numpy(zero_copy_only=False)

    def texts(self, idx: Sequence[int] | np.ndarray) -> list[str]:
        """The texts of passages `idx`, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        if self._texts is not None:
            return [self._texts[i] for i in idx.tolist()]
        if _stamp(self._file) != self._stamp:
            raise DrscalingError(f"{self._file} changed while it was in use: rerun the command")
        out: list[str] = []
        with open(self._file, "rb") as fh:
            for start, length in self._spans[idx].tolist():
                fh.seek(start)
                out.append(str(json.loads(fh.read(length))["text"]))
        return out

    def view(self, idx: np.ndarray | None = None) -> Texts:
        return Texts(self, np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64))

    def frame(self, idx: np.ndarray | None = None) -> pd.DataFrame:
        """(pid, text) of passages `idx` (all: None), as load_split's frames are typed."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        return pd.DataFrame({"pid": self.pid_list(idx), "text": self.texts(idx)}, columns=["pid", "text"]).astype(str)


class Texts(Sequence[str]):
    """A corpus' texts for some of its passages, read when indexed: a slice reads only its passages."""

    def __init__(self, corpus: Corpus, idx: np.ndarray):
        self.corpus, self.idx = corpus, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.corpus.texts(self.idx[i])
        return self.corpus.texts(self.idx[[i]])[0]

    def __iter__(self) -> Iterator[str]:
        for s in range(0, len(self), 4096):
            yield from self[s : s + 4096]


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def read_corpus(path: Path) -> Corpus:
    """A corpus.jsonl read lean: Arrow parses the pids (the texts are checked, then dropped block by
    block) and one pass over the lines records where each passage is. A file Arrow cannot read the
    same way as read_jsonl (bad JSON, a missing or non-string field) goes through read_jsonl, which
    names the problem, or keeps its texts in memory where read_jsonl accepts it."""
    schema = pa.schema([("pid", pa.string()), ("text", pa.string())])
    try:
        reader = pa_json.open_json(path, read_options=pa_json.ReadOptions(block_size=16 << 20),
                                   parse_options=pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))
        parts = []
        for batch in reader:
            if batch.column("pid").null_count or batch.column("text").null_count:
                raise pa.ArrowInvalid("null field")
            parts.append(batch.column("pid"))
        pids = pa.concat_arrays(parts) if parts else pa.array([], pa.string())
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pids = None
    spans = _line_spans(path) if pids is not None else None
    if pids is None or len(pids) != len(spans) or not len(pids):
        return Corpus.from_frame(pd.DataFrame(read_jsonl(path, FILES["corpus"]), columns=list(FILES["corpus"])).astype(str))
    return Corpus(pids, file=Path(path), spans=spans)


def _line_spans(path: Path) -> np.ndarray:
    """[n, 2] (byte offset, length) of each non-blank line, as read_jsonl and Arrow count them."""
    spans, pos = array.array("q"), 0  # 8 bytes an entry while it grows, not a Python int
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                spans.extend((pos, len(line)))
            pos += len(line)
    return np.frombuffer(spans, dtype=np.int64).reshape(-1, 2).copy()


@dataclass
class Split:
    corpus: pd.DataFrame | Corpus  # pid, text (a Corpus: read lean, see load_split)
    queries: pd.DataFrame  # qid, text
    qrels: pd.DataFrame  # qid, pid

    def pairs(self) -> pd.DataFrame:
        """(qid, query, pid, passage) for every qrel, in qrels order."""
        q = self.qrels.merge(self.queries.rename(columns={"text": "query"}), on="qid", how="left")
        corpus = self.corpus
        if isinstance(corpus, Corpus):  # only the judged passages' texts
            found = corpus.index_of(q["pid"])
            corpus = corpus.frame(np.unique(found[found >= 0]))
        return q.merge(corpus.rename(columns={"text": "passage"}), on="pid", how="left")


def as_corpus(corpus: pd.DataFrame | Corpus) -> Corpus:
    return corpus if isinstance(corpus, Corpus) else Corpus.from_frame(corpus)


def load_split(root: str | Path, split: str, *, relevance: bool = False, lean: bool = False) -> Split:
    """A split's frames with the FILES columns; `relevance=True` adds qrels' grade (1 where absent);
    `lean=True` reads the corpus as a Corpus (pids in memory, texts read when asked for)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise DrscalingError(f"split '{split}' not found: {folder} (run `drscaling prepare` first)")
    frames = {}
    for name, cols in FILES.items():
        if lean and name == "corpus":
            frames[name] = read_corpus(folder / f"{name}.jsonl")
            continue
        rows = read_jsonl(folder / f"{name}.jsonl", cols)
        frames[name] = pd.DataFrame(rows, columns=list(cols)).astype(str)
        if relevance and name == "qrels":
            frames[name]["relevance"] = [int(r.get("relevance", 1)) for r in rows]
    return Split(**frames)


def save_dataset(splits: dict[str, Split], dest: str | Path) -> None:
    """Write all splits at once: `dest` appears complete or not at all."""
    written: dict[int, Path] = {}  # a frame shared by several splits is written once, then linked
    with atomic_path(dest) as tmp:
        for name, split in splits.items():
            for fname, cols in FILES.items():
                frame = getattr(split, fname)
                target = tmp / name / f"{fname}.jsonl"
                if id(frame) in written:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(written[id(frame)], target)
                    continue
                out_cols = [*cols, *(c for c in OPTIONAL.get(fname, ()) if c in frame.columns)]
                write_jsonl(target, frame[out_cols].to_dict("records"))
                written[id(frame)] = target
