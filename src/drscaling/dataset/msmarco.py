"""MS MARCO passage files: collection.tsv, queries.{split}.tsv and qrels.{split}.tsv (plain or gzipped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from drscaling.data import Split
from drscaling.dataset.build import ImportReport, check_destination, id_text_table, link, positives, write_dataset
from drscaling.dataset.reading import check_text, format_hint, iter_lines
from drscaling.errors import DrscalingError


def _tsv_entries(path: Path, names: tuple[str, str]) -> Iterator[tuple[str, str, str]]:
    """(id, text, where) of each line of a header-less two-column TSV, read strictly: every line must
    have at least two tab-separated fields and hold valid text."""
    n = 0
    for lineno, line in iter_lines(path, "TSV file"):
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
    n = 0
    for lineno, line in iter_lines(path, "qrels file"):
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
