"""A BEIR folder: corpus.jsonl, queries.jsonl and qrels/<name>.tsv (Thakur et al., 2021).

    corpus.jsonl     {"_id", "title", "text", ...}: a passage is (title + " " + text).strip(), as BEIR's
                     models join them (text alone, stripped, when there is no title)
    queries.jsonl    {"_id", "text", ...}
    qrels/<name>.tsv query-id <TAB> corpus-id <TAB> score, after a header line

Split mapping: canonical train/dev/test come from qrels/train.tsv, qrels/dev.tsv, qrels/test.tsv unless
`--split NAME=FILE` says otherwise; several splits naming one file are carved out of it by query group
(e.g. `--split dev=train` for a dataset without dev.tsv). A named file that does not exist is an error
listing the qrels files the folder has, raised before the corpus is read.

Scores: a score > 0 is a relevant judgement, kept with its grade in the canonical qrels' `relevance`
field. A score <= 0 is judged non-relevant: it is dropped and counted, because every consumer of the
canonical qrels (training pairs, evaluation positives) reads each row as a positive. The corpus is shared
by all splits (hard-linked), as in BEIR's own evaluation: the test corpus is the negative pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from drscaling.data import SPLITS
from drscaling.dataset.build import Collection, ImportReport, build, check_destination, id_text_table, link, positives
from drscaling.dataset.reading import check_id, check_text, format_hint, iter_jsonl, iter_lines
from drscaling.errors import DrscalingError


def _file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def qrels_files(folder: Path) -> dict[str, Path]:
    """{name: path} of the folder's qrels/<name>.tsv(.gz) files."""
    qdir = folder / "qrels"
    if not qdir.is_dir():
        return {}
    out = {}
    for p in sorted(qdir.iterdir()):
        for ext in (".tsv", ".tsv.gz"):
            if p.name.endswith(ext) and not p.name.startswith("."):
                out[p.name[: -len(ext)]] = p
    return out


def resolve_mapping(folder: Path, mapping: dict[str, str] | None) -> tuple[dict[str, str], dict[str, Path]]:
    """(split -> qrels name, qrels name -> path); a missing file is an error naming what exists."""
    files = qrels_files(folder)
    mapping = {s: (mapping or {}).get(s, s) for s in SPLITS}
    have = ", ".join(f"qrels/{p.name}" for p in files.values()) or "no qrels/*.tsv files"
    for split, name in mapping.items():
        if name not in files:
            alt = next((n for n in ("train", "test", "dev") if n in files), None)
            fix = f"; map the split to an existing file, e.g. --split {split}={alt} (carved out of it by query group)" if alt else ""
            raise DrscalingError(f"{folder}: no qrels/{name}.tsv for the {split} split (the folder has {have}){fix}")
    return mapping, {n: files[n] for n in set(mapping.values())}


def _entries(path: Path, kind: str, text_of) -> Iterator[tuple[str, str, str]]:
    """(id, text, where) for each line of a BEIR corpus or queries file."""
    for lineno, row in iter_jsonl(path, f"BEIR {kind} file"):
        where = f"{path}: line {lineno}"
        if "_id" not in row:
            raise DrscalingError(f"{where} lacks the field '_id' (its fields: {', '.join(sorted(row)[:6]) or 'none'})")
        yield check_id(row["_id"], where, "_id"), text_of(row, where), where


def _passage(row: dict, where: str) -> str:
    text = check_text(row.get("text", ""), where, "text", allow_blank=True)
    title = row.get("title")
    if title is None:
        return text.strip()
    title = check_text(title, where, "title", allow_blank=True)
    return (title + " " + text).strip()


def _query(row: dict, where: str) -> str:
    if "text" not in row:
        raise DrscalingError(f"{where} lacks the field 'text'")
    return check_text(row["text"], where, "text", allow_blank=True)


def _judgements(path: Path) -> Iterator[tuple[str, str, int]]:
    """(query-id, corpus-id, score) of each line of a BEIR qrels file; the header line is skipped."""
    first = True
    for lineno, line in iter_lines(path, "BEIR qrels file"):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != 3:
            fields = line.split()
        where = f"{path}: line {lineno}"
        if len(fields) != 3:
            raise DrscalingError(f"{where} has {len(fields)} field(s), expected 3 tab-separated: query-id, corpus-id, score")
        if first:
            first = False
            try:
                int(fields[2])
            except ValueError:
                continue  # the header line (query-id, corpus-id, score)
        qid, pid, score = fields
        try:
            rel = int(score)
        except ValueError:
            raise DrscalingError(f"{where}: score {score!r} is not an integer") from None
        yield check_text(qid, where, "query-id"), check_text(pid, where, "corpus-id"), rel


def read_beir(folder: str | Path, mapping: dict[str, str] | None = None) -> tuple[Collection, dict[str, str]]:
    folder = Path(folder)
    if not folder.exists():
        raise DrscalingError(f"BEIR folder not found: {folder}")
    if not folder.is_dir():
        raise DrscalingError(
            f"{folder}: is a file; --format beir reads a folder holding corpus.jsonl, queries.jsonl and"
            " qrels/<split>.tsv" + format_hint(folder, "beir")
        )
    corpus_file, queries_file = _file(folder, "corpus.jsonl"), _file(folder, "queries.jsonl")
    missing = [n for n, f in (("corpus.jsonl", corpus_file), ("queries.jsonl", queries_file)) if f is None]
    if missing:
        raise DrscalingError(
            f"{folder}: not a BEIR folder: no {' or '.join(missing)}" + format_hint(folder, "beir")
        )
    mapping, files = resolve_mapping(folder, mapping)
    notes: list[str] = []
    judged = {}
    for name, path in sorted(files.items()):
        judged[name], n = positives(_judgements(path), str(path))
        notes += n
    queries, n = id_text_table(_entries(queries_file, "queries", _query), "qid", str(queries_file))
    notes += n
    corpus, n = id_text_table(_entries(corpus_file, "corpus", _passage), "pid", str(corpus_file))
    notes += n
    labels = {name: str(path) for name, path in files.items()}
    sources, n = link(corpus, dict.fromkeys(judged, queries), judged, labels)
    return Collection(corpus=corpus, sources=sources, shared_corpus=True, notes=notes + n), mapping


def import_beir(
    folder: str | Path, dest: str | Path, *, mapping: dict[str, str] | None = None, dev_size: int | None = None,
    test_size: int | None = None, seed: int = 13, defaults: dict[str, int] | None = None,
) -> ImportReport:
    check_destination(dest)
    coll, mapping = read_beir(folder, mapping)
    return build(coll, mapping, dest, dev_size=dev_size, test_size=test_size, seed=seed, defaults=defaults)
