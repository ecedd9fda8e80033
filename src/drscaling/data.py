"""The canonical dataset: corpus, queries and qrels per split, and the importers that produce it.

On disk a dataset is a folder with one sub-folder per split (train, dev, test), each holding
    corpus.jsonl   {"pid": str, "text": str}
    queries.jsonl  {"qid": str, "text": str}
    qrels.jsonl    {"qid": str, "pid": str[, "relevance": int]}
Each split's corpus holds the passages its queries may be scored against; the test corpus is also
the pool contrastive-entropy negatives are drawn from. Every qrels row is a relevant pair; importers of
graded judgements (BEIR, ir_datasets) keep the grade (> 0) in the optional `relevance` field and drop
judged-non-relevant rows. The importers of outside formats live in drscaling.dataset.

A corpus of millions of passages is read lean (`load_split(..., lean=True)`, `Corpus`): its pids in
an Arrow array, each passage's place in corpus.jsonl, and texts read from the file only when asked for.
"""

from __future__ import annotations

import array
import hashlib
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


def stable_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Splitting grouped pairs (Debian snapshot, plain pairs)
# ---------------------------------------------------------------------------------------------


def split_pairs(
    pairs: pd.DataFrame, dev_size: int, test_size: int, seed: int, group: str
) -> dict[str, Split]:
    """Split (qid, query, pid, passage, <group>) rows so that no group lands in two splits.

    Groups are shuffled with `seed`; dev and test take whole groups until they hold at least the
    requested number of pairs, the rest is train.
    """
    if dev_size < 1 or test_size < 1:
        raise DrscalingError(f"dev_size and test_size must be >= 1 (got {dev_size}, {test_size})")
    groups = np.array(sorted(pairs[group].unique()))
    if len(pairs) < dev_size + test_size + 1:
        raise DrscalingError(
            f"only {len(pairs)} pairs: too few for dev_size={dev_size} + test_size={test_size} + train"
        )
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    sizes = pairs.groupby(group).size()
    assignment: dict[str, str] = {}
    counts = {"test": 0, "dev": 0}
    for g in groups:
        if counts["test"] < test_size:
            assignment[g] = "test"
            counts["test"] += int(sizes[g])
        elif counts["dev"] < dev_size:
            assignment[g] = "dev"
            counts["dev"] += int(sizes[g])
        else:
            assignment[g] = "train"
    which = pairs[group].map(assignment)
    out: dict[str, Split] = {}
    for name in SPLITS:
        part = pairs[which == name]
        out[name] = Split(
            corpus=part[["pid", "passage"]].drop_duplicates("pid").rename(columns={"passage": "text"}),
            queries=part[["qid", "query"]].drop_duplicates("qid").rename(columns={"query": "text"}),
            qrels=part[["qid", "pid"]].drop_duplicates(),
        )
    return out


def prepare_debian(raw: str | Path, dest: str | Path, dev_size: int, test_size: int, seed: int) -> dict:
    """Turn the Debian snapshot (one JSON line per package) into canonical train/dev/test splits."""
    rows = read_jsonl(raw, ("package", "source", "query", "passage"))
    pairs = pd.DataFrame(rows).astype(str)
    pairs["qid"] = "q:" + pairs["package"]
    pairs["pid"] = "p:" + pairs["package"]
    splits = split_pairs(pairs, dev_size, test_size, seed, group="source")
    save_dataset(splits, dest)
    return {name: len(s.qrels) for name, s in splits.items()}


def import_pairs(src: str | Path, dest: str | Path, dev_size: int | None, test_size: int | None, seed: int,
                 defaults: dict[str, int] | None = None):
    """Import JSON lines of {"query": ..., "passage": ...}; ids are content hashes, so re-imports agree.

    See drscaling.dataset.pairs (de-duplication, sizes that fit small data) and .build (leak-free carving).
    Returns the pairs per split (a dict with the report's notes and message()).
    """
    from drscaling.dataset.pairs import import_pairs as _import

    return _import(src, dest, dev_size, test_size, seed, defaults)


# ---------------------------------------------------------------------------------------------
# MS MARCO passage files
# ---------------------------------------------------------------------------------------------


def _tsv_entries(path: Path, names: tuple[str, str]) -> Iterator[tuple[str, str, str]]:
    """(id, text, where) of each line of a header-less two-column TSV, read strictly: every line must
    have at least two tab-separated fields and hold valid text."""
    from drscaling.dataset.reading import check_text
    from drscaling.dataset.reading import iter_lines as strict_lines

    n = 0
    for lineno, line in strict_lines(path, "TSV file"):
        if not line:
            continue
        # A plain split: MS MARCO's TSVs have no quoting, and a csv reader fails on a bare \r in a text.
        fields = line.split("\t")
        where = f"{path}: line {lineno}"
        if len(fields) < 2:
            raise DrscalingError(f"{where} has {len(fields)} tab-separated field(s), expected 2 ({', '.join(names)})")
        n += 1
        yield check_text(fields[0], where, names[0]), check_text(fields[1], where, names[1], allow_blank=True), where
    if not n:
        raise DrscalingError(f"{path}: file is empty")


def _find(src: Path, stem: str) -> Path | None:
    for candidate in (src / f"{stem}.tsv", src / f"{stem}.tsv.gz"):
        if candidate.exists():
            return candidate
    return None


def import_msmarco(src: str | Path, dest: str | Path) -> dict:
    """Import MS MARCO passage files: collection.tsv, queries.{split}.tsv, qrels.{split}.tsv.

    MS MARCO's split names map as train->train, dev->dev, eval/test->test; TREC-style qrels
    (qid 0 pid rel) and two-column qrels are both accepted. Every split shares the collection
    (hard-linked, not copied). As for every importer (drscaling.dataset.build): a repeated id with
    the same text, a blank text, a judgement with relevance <= 0 or naming an unknown query or
    passage are dropped and counted in the report; an id repeated with another text is an error.
    The dataset appears at `dest` complete or not at all.
    """
    from drscaling.dataset.build import ImportReport, check_destination, id_text_table, link, positives, write_dataset
    from drscaling.dataset.reading import format_hint

    src = Path(src)
    check_destination(dest)
    if not src.is_dir():
        raise DrscalingError(
            f"{src}: {'is a file' if src.exists() else 'not found'}; --format msmarco reads a folder of"
            " collection.tsv, queries.{train,dev,eval}.tsv and qrels.{train,dev,eval}.tsv" + format_hint(src, "msmarco")
        )
    collection = _find(src, "collection")
    if collection is None:
        raise DrscalingError(f"{src}: no collection.tsv(.gz) found" + format_hint(src, "msmarco"))
    corpus, notes = id_text_table(_tsv_entries(collection, ("pid", "text")), "pid", str(collection))
    splits: dict[str, Split] = {}
    for split, names in {"train": ("train",), "dev": ("dev",), "test": ("test", "eval")}.items():
        qfile = next((f for n in names if (f := _find(src, f"queries.{n}"))), None)
        rfile = next((f for n in names if (f := _find(src, f"qrels.{n}"))), None)
        if qfile is None or rfile is None:
            raise DrscalingError(f"{src}: missing queries.{names[0]}.tsv or qrels.{names[0]}.tsv")
        queries, n = id_text_table(_tsv_entries(qfile, ("qid", "text")), "qid", str(qfile))
        judged, m = positives(_qrels_rows(rfile), str(rfile))
        linked, k = link(corpus, {split: queries}, {split: judged}, {split: str(rfile)})
        notes += n + m + k
        qrels = linked[split].qrels[["qid", "pid"]]
        if qrels.empty:
            raise DrscalingError(
                f"{rfile}: no usable judgement for the {split} split (each must name a query of {qfile.name}"
                f" and a passage of {collection.name}, both with text, with relevance > 0)"
                + (f"; {'; '.join(notes)}" if notes else "")
            )
        splits[split] = Split(corpus=corpus, queries=linked[split].queries, qrels=qrels)
    write_dataset(splits, dest)
    return ImportReport({name: len(s.qrels) for name, s in splits.items()}, Path(dest),
                        {name: len(s.corpus) for name, s in splits.items()}, notes)


def _qrels_rows(path: Path) -> Iterator[tuple[str, str, int]]:
    """(qid, pid, relevance) of each line of a TREC (qid iter pid rel) or two-column (qid pid) qrels file."""
    from drscaling.dataset.reading import check_text
    from drscaling.dataset.reading import iter_lines as strict_lines

    n = 0
    for lineno, line in strict_lines(path, "qrels file"):
        if not line:
            continue
        fields = line.split()
        where = f"{path}: line {lineno}"
        if len(fields) == 4:  # TREC: qid iter pid rel
            try:
                rel = int(fields[3])
            except ValueError:
                raise DrscalingError(f"{where}: relevance {fields[3]!r} is not an integer") from None
            qid, pid = fields[0], fields[2]
        elif len(fields) == 2:
            (qid, pid), rel = fields, 1
        else:
            raise DrscalingError(f"{where} is neither 'qid pid' nor 'qid 0 pid rel'")
        n += 1
        yield check_text(qid, where, "qid"), check_text(pid, where, "pid"), rel
    if not n:
        raise DrscalingError(f"{path}: no relevance judgements")
