"""Any ir_datasets id (https://ir-datasets.com), read through the `ir_datasets` package.

The package is optional and imported only here. ir_datasets downloads a dataset's files on first use
(network access needed, cached under ~/.ir_datasets or $IR_DATASETS_HOME); offline only what is cached
can be read. Everything is read into memory first and the dataset is written at the end, so an id that
does not exist or cannot be downloaded fails with a clear error and leaves nothing at the destination.

Split mapping, given the id ID:
- ID has qrels itself (msmarco-passage/train, beir/scifact/test): train, dev and test are all carved out
  of its judgements by query group (see build), with --dev-size/--test-size or sizes that fit.
- ID has no qrels but sub-datasets ID/train, ID/dev, ID/test do (beir/scifact, beir/fiqa): each split
  comes from its sub-dataset; a missing one is an error listing those that exist.
- `--split NAME=SOURCE` overrides either: SOURCE is a full id or a name under ID (`--split dev=train`
  carves dev out of ID/train).
Documents always come from ID and form one corpus shared by every split (the test corpus is the
negative pool). Texts are the package's default_text() (BEIR: title + " " + text), stripped. Graded
relevance is kept in the canonical qrels' `relevance` field; relevance <= 0 is dropped and counted.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from drscaling.data import SPLITS
from drscaling.dataset.build import Collection, ImportReport, build, check_destination, id_text_table, link, positives
from drscaling.dataset.reading import check_id, check_text, format_hint
from drscaling.errors import DrscalingError

PIN = "ir-datasets==0.6.3"  # as in requirements.txt


def _package():
    try:
        import ir_datasets
    except ImportError:
        raise DrscalingError(f"--format ir_datasets needs the ir_datasets package: pip install {PIN}") from None
    return ir_datasets


def _load(irds, dataset_id: str, hint_path: bool = True):
    try:
        return irds.load(dataset_id)
    except KeyError:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure of the package becomes a clear message
        raise DrscalingError(f"ir_datasets could not open {dataset_id!r} ({type(exc).__name__}: {exc})") from exc
    close = difflib.get_close_matches(dataset_id, list(irds.registry), n=3, cutoff=0.6)
    maybe = f"; did you mean {', '.join(close)}?" if close else ""
    local = ""
    if hint_path and Path(dataset_id).exists():
        local = f"; {dataset_id} is a local path: --format ir_datasets takes a dataset id" + (
            format_hint(dataset_id, "ir_datasets") or ", use --format beir, msmarco or pairs for local files")
    raise DrscalingError(
        f"ir_datasets {irds.__version__} has no dataset {dataset_id!r} (ids look like msmarco-passage/train or"
        f" beir/scifact; see https://ir-datasets.com){maybe}{local}; nothing was written"
    )


def _exists(irds, dataset_id: str) -> bool:
    try:
        irds.registry[dataset_id]
    except KeyError:
        return False
    return True


def _with_qrels(irds, dataset_id: str) -> list[str]:
    out = []
    for key in sorted(irds.registry):
        if key.startswith(dataset_id + "/"):
            try:
                if irds.registry[key].has_qrels():
                    out.append(key)
            except Exception:  # noqa: BLE001, S112 - a broken registry entry is just not listed
                continue
    return out


def resolve_mapping(irds, dataset_id: str, mapping: dict[str, str] | None) -> dict[str, str]:
    """split -> the ir_datasets id its queries and judgements come from."""
    base = _load(irds, dataset_id)
    if not base.has_docs():
        raise DrscalingError(f"ir_datasets {dataset_id!r} has no documents; name a dataset with a corpus")
    mapping = dict(mapping or {})
    out: dict[str, str] = {}
    for split in SPLITS:
        src = mapping.get(split)
        if src is None:
            if base.has_qrels():
                out[split] = dataset_id
                continue
            child = f"{dataset_id}/{split}"
            if _exists(irds, child) and irds.registry[child].has_qrels():
                out[split] = child
                continue
            children = _with_qrels(irds, dataset_id)
            if not children:
                raise DrscalingError(f"ir_datasets {dataset_id!r} has no relevance judgements (qrels), nor"
                                     " sub-datasets with them; name a dataset with qrels")
            pick = next((c for c in children if c.endswith("/train")), children[0])
            fix = f"--split {split}={pick[len(dataset_id) + 1:]}"
            raise DrscalingError(
                f"ir_datasets {dataset_id!r} has no qrels itself and no {child} for the {split} split; its"
                f" sub-datasets with qrels are {', '.join(children)}. Map the split to one of them, e.g. {fix}"
                f" (carved out of it by query group); nothing was written"
            )
        candidates = [src] if src == dataset_id else [f"{dataset_id}/{src}", src]
        full = next((c for c in candidates if _exists(irds, c)), None)
        if full is None:
            raise DrscalingError(f"--split {split}={src}: ir_datasets has no {' nor '.join(map(repr, candidates))}")
        ds = _load(irds, full, hint_path=False)
        if not (ds.has_queries() and ds.has_qrels()):
            raise DrscalingError(f"--split {split}={src}: ir_datasets {full!r} has no queries or no qrels")
        out[split] = full
    return out


def _text(obj: Any, what: str) -> str:
    if hasattr(obj, "default_text"):
        return obj.default_text()
    if hasattr(obj, "text"):
        return obj.text
    raise DrscalingError(f"{what}: has no text (fields: {', '.join(getattr(obj, '_fields', ()))})")


def _guard(dataset_id: str, what: str, it: Iterator) -> Iterator:
    """Iterate `it`; a failure inside ir_datasets (a download without network, a corrupt cache) becomes
    a DrscalingError naming the id and what was being read."""
    try:
        yield from it
    except DrscalingError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DrscalingError(
            f"ir_datasets {dataset_id!r}: could not read its {what} ({_brief(exc)}). Its files may need"
            " downloading, which needs network access (or a copy in $IR_DATASETS_HOME); nothing was written"
        ) from exc


def _brief(exc: BaseException) -> str:
    """One readable line for an exception from ir_datasets (its download errors nest whole reprs)."""
    head = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    causes = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], list) else []
    first = next((c[1] for c in causes if isinstance(c, tuple) and len(c) == 2), None)
    text = f"{type(exc).__name__}: {head}" + (f"; first: {type(first).__name__}: {first}" if first else "")
    return text if len(text) <= 300 else text[:297] + "..."


def _entries(items: Iterator, dataset_id: str, what: str, id_field: str) -> Iterator[tuple[str, str, str]]:
    """(id, text, where) of each document or query, its id and text checked; `where` names it in messages."""
    for i, item in enumerate(items):
        where = f"ir_datasets {dataset_id!r} {what} #{i + 1}"
        xid = check_id(getattr(item, id_field), where, id_field)
        where += f" ({xid})"
        yield xid, check_text(_text(item, where), where, "text", allow_blank=True).strip(), where


def _docs(ds, dataset_id: str) -> Iterator[tuple[str, str, str]]:
    total = None
    try:
        total = ds.docs_count()
    except Exception:  # noqa: BLE001 - a count is only for the progress bar
        total = None
    bar = tqdm(_guard(dataset_id, "documents", ds.docs_iter()), total=total, desc=f"{dataset_id} docs",
               unit="doc", disable=None)
    yield from _entries(bar, dataset_id, "document", "doc_id")


def _queries(ds, dataset_id: str) -> Iterator[tuple[str, str, str]]:
    yield from _entries(_guard(dataset_id, "queries", ds.queries_iter()), dataset_id, "query", "query_id")


def _qrels(ds, dataset_id: str) -> Iterator[tuple[str, str, int]]:
    for i, r in enumerate(_guard(dataset_id, "qrels", ds.qrels_iter())):
        where = f"ir_datasets {dataset_id!r} qrel #{i + 1}"
        rel = r.relevance
        if isinstance(rel, bool) or not isinstance(rel, int):
            try:
                rel = int(rel)
            except (TypeError, ValueError):
                raise DrscalingError(f"{where}: relevance {rel!r} is not an integer") from None
        yield check_id(r.query_id, where, "query_id"), check_id(r.doc_id, where, "doc_id"), rel


def read_ir_datasets(dataset_id: str, mapping: dict[str, str] | None = None) -> tuple[Collection, dict[str, str]]:
    irds = _package()
    mapping = resolve_mapping(irds, dataset_id, mapping)
    notes: list[str] = []
    judged, queries = {}, {}
    for src in sorted(set(mapping.values())):
        ds = _load(irds, src, hint_path=False)
        judged[src], n = positives(_qrels(ds, src), f"{src} qrels")
        notes += n
        queries[src], n = id_text_table(_queries(ds, src), "qid", f"{src} queries")
        notes += n
    corpus, n = id_text_table(_docs(_load(irds, dataset_id), dataset_id), "pid", f"{dataset_id} docs")
    notes += n
    sources, n = link(corpus, queries, judged, {s: s for s in judged})
    return Collection(corpus=corpus, sources=sources, shared_corpus=True, notes=notes + n), mapping


def import_ir_datasets(
    dataset_id: str, dest: str | Path, *, mapping: dict[str, str] | None = None, dev_size: int | None = None,
    test_size: int | None = None, seed: int = 13, defaults: dict[str, int] | None = None,
) -> ImportReport:
    check_destination(dest)
    coll, mapping = read_ir_datasets(dataset_id, mapping)
    return build(coll, mapping, dest, dev_size=dev_size, test_size=test_size, seed=seed, defaults=defaults)
