"""The last mile every importer shares: from read judgements to a canonical dataset on disk.

An importer reads its files into a `Collection`: a corpus and one or more `Source`s (queries with their
positive judgements: a BEIR qrels file, an ir_datasets id, a pairs file). A mapping names the source of
each canonical split. Splits that share a source are carved out of it here:

- Queries and passages linked by a judgement form a group (a connected component), and a group never
  spans two splits, so no query and no positive passage of dev/test is seen in train.
- Sizes count unique (query, passage) pairs after de-duplication, and are met exactly whenever the
  groups allow it (first fit over seeded-shuffled groups).
- Sizes not given on the command line start from params.yaml (dev 1,000, test 1,000); when those would
  leave train under half the data they scale down to a fifth (test) and a tenth (dev), keeping at
  least 257 test passages where the test corpus is the test pairs' passages, so contrastive entropy
  with 256 negatives works. When even that is impossible the error says which flags to pass.

Splits from different sources (BEIR's train.tsv and test.tsv) are taken as they are, except that a
train judgement whose query or passage is also judged in dev or test is dropped (and counted), as the
canonical format forbids that leak. Everything dropped anywhere is counted in the report, never silent.

The dataset is written into a temporary folder next to the destination and renamed onto it at the end:
on any failure the destination is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from drscaling.data import SPLITS, Split, save_dataset
from drscaling.design import EVAL_NEGATIVES
from drscaling.design import MIN_EVAL_PASSAGES as MIN_TEST_PASSAGES
from drscaling.errors import DrscalingError
from drscaling.files import NoRoomError


@dataclass
class Source:
    """Queries and their positive judgements from one place."""

    name: str  # as the user knows it: a file path, an ir_datasets id
    queries: pd.DataFrame  # qid, text (queries without a positive judgement are left out later)
    qrels: pd.DataFrame  # qid, pid[, relevance]: positives only, unique (qid, pid)


@dataclass
class Collection:
    corpus: pd.DataFrame  # pid, text; pids unique
    sources: dict[str, Source]
    shared_corpus: bool  # True: every split gets the whole corpus (BEIR, ir_datasets, MS MARCO);
    #                      False: each split's corpus is its pairs' passages (pairs files)
    notes: list[str] = field(default_factory=list)  # what was dropped or repaired, with counts


class ImportReport(dict):
    """Pairs per split (a dict, as importers always returned), plus what was chosen and dropped."""

    def __init__(self, counts: dict[str, int], dest: Path, corpus: dict[str, int], notes: list[str]):
        super().__init__(counts)
        self.dest = dest
        self.corpus = corpus
        self.notes = notes

    def message(self) -> str:
        head = f"imported into {self.dest}: " + ", ".join(
            f"{k}={v:,} pairs ({self.corpus[k]:,} passages)" for k, v in self.items()
        )
        return "\n  ".join([head, *self.notes])


# ---------------------------------------------------------------------------------------------
# tables from any reader: ids and texts, judgements
# ---------------------------------------------------------------------------------------------


def id_text_table(rows: Iterable[tuple[str, str, str]], idcol: str, label: str) -> tuple[pd.DataFrame, list[str]]:
    """(id, text, where) rows as a table of unique ids, plus notes.

    A repeated id with the same text is dropped and counted; with another text it is an error naming both
    places. Entries with empty text are dropped and counted (a judgement naming them is dropped later).
    """
    ids: list[str] = []
    texts: list[str] = []
    wheres: list[str] = []
    first: dict[str, int] = {}
    repeats = 0
    for rid, text, where in rows:
        if rid in first:
            if texts[first[rid]] != text:
                raise DrscalingError(f"{where}: id {rid!r} repeats {wheres[first[rid]]} with a different text; an id must name one text")
            repeats += 1
            continue
        first[rid] = len(ids)
        ids.append(rid)
        texts.append(text)
        wheres.append(where)
    notes = []
    if repeats:
        notes.append(f"{label}: dropped {repeats:,} repeated entr(ies) (same id and text)")
    table = pd.DataFrame({idcol: pd.Series(ids, dtype=object), "text": pd.Series(texts, dtype=object)})
    blank = np.array([not t.strip() for t in texts], dtype=bool)
    if blank.any():
        notes.append(f"{label}: dropped {int(blank.sum()):,} entr(ies) with empty text (e.g. id {table.loc[blank, idcol].iloc[0]!r})")
        table = table[~blank].reset_index(drop=True)
    return table, notes


def positives(rows: Iterable[tuple[str, str, int]], label: str) -> tuple[pd.DataFrame, list[str]]:
    """(qid, pid, relevance) judgements as the positive qrels (relevance > 0), plus notes.

    Judgements with relevance <= 0 are judged non-relevant: dropped and counted, as every consumer of the
    canonical qrels reads each row as a positive. A repeated (qid, pid) keeps its highest grade.
    """
    best: dict[tuple[str, str], int] = {}
    nonrel = repeats = 0
    for qid, pid, rel in rows:
        if rel <= 0:
            nonrel += 1
            continue
        key = (qid, pid)
        if key in best:
            repeats += 1
            best[key] = max(best[key], rel)
        else:
            best[key] = rel
    notes = []
    if nonrel:
        notes.append(f"{label}: dropped {nonrel:,} judgement(s) with relevance <= 0 (judged non-relevant;"
                     " the canonical qrels hold positives only)")
    if repeats:
        notes.append(f"{label}: merged {repeats:,} repeated (query, passage) judgement(s), keeping the highest grade")
    qrels = pd.DataFrame({
        "qid": pd.Series([k[0] for k in best], dtype=object),
        "pid": pd.Series([k[1] for k in best], dtype=object),
        "relevance": pd.Series(list(best.values()), dtype="int64"),
    })
    return qrels, notes


def link(corpus: pd.DataFrame, queries: dict[str, pd.DataFrame], qrels: dict[str, pd.DataFrame],
         labels: dict[str, str]) -> tuple[dict[str, Source], list[str]]:
    """Sources whose judgements name only known queries and passages; the others dropped and counted.

    `queries` maps each source to its query table (several sources may share one table object).
    """
    known_p = set(corpus["pid"])
    notes: list[str] = []
    sources = {}
    for name, judged in qrels.items():
        table = queries[name]
        no_q = ~judged["qid"].isin(set(table["qid"]))
        no_p = ~judged["pid"].isin(known_p) & ~no_q
        for mask, what, col in ((no_q, "an unknown query (or one with empty text)", "qid"),
                                (no_p, "an unknown passage (or one with empty text)", "pid")):
            if mask.any():
                notes.append(f"{labels[name]}: dropped {int(mask.sum()):,} judgement(s) naming {what},"
                             f" e.g. {judged.loc[mask, col].iloc[0]!r}")
        judged = judged[~no_q & ~no_p].reset_index(drop=True)
        table = table[table["qid"].isin(set(judged["qid"]))].reset_index(drop=True)
        sources[name] = Source(name=labels[name], queries=table, qrels=judged)
    return sources, notes


# ---------------------------------------------------------------------------------------------
# destination
# ---------------------------------------------------------------------------------------------


def check_destination(dest: str | Path) -> Path:
    """Fail before reading anything when `dest` cannot become a dataset folder.

    An existing dataset folder (only train/dev/test inside) is replaced as a whole at the end; any other
    existing file or non-empty folder is refused, so a typo can never wipe unrelated files.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir():
            raise DrscalingError(f"destination {dest} exists and is not a folder")
        other = sorted(p.name for p in dest.iterdir() if p.name not in SPLITS)
        if other:
            raise DrscalingError(
                f"destination {dest} is not empty and is not a dataset folder (it holds {', '.join(other[:5])});"
                " choose a new folder, or remove it first"
            )
    ancestor = dest.parent if dest.parent != Path("") else Path(".")
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DrscalingError(f"cannot create {dest}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DrscalingError(f"cannot write to {dest}: {ancestor} is not writable")
    return dest


def write_dataset(splits: dict[str, Split], dest: str | Path) -> None:
    """Write all splits into a temporary sibling of `dest`, then rename it onto `dest`."""
    dest = check_destination(dest)
    created: list[Path] = []
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(created):
            folder.mkdir()
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".import", dir=dest.parent))
        try:
            save_dataset(splits, staging / "new")
            old = staging / "old"
            if dest.exists():
                os.replace(dest, old)
            try:
                os.replace(staging / "new", dest)
            except OSError:
                if old.exists():
                    os.replace(old, dest)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, NoRoomError) as exc:
        for folder in created:  # deepest first; only the folders this call made, and only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, NoRoomError):  # named by the staging file it hit: name the dataset instead
            raise NoRoomError(dest, exc.reason) from exc.__cause__
        what = exc.strerror or str(exc)
        raise DrscalingError(f"cannot write the dataset to {dest}: {what}; nothing was written") from exc


# ---------------------------------------------------------------------------------------------
# sizes and carving
# ---------------------------------------------------------------------------------------------


def groups_of(qrels: pd.DataFrame) -> np.ndarray:
    """A group label per qrels row: rows sharing a query or a passage (transitively) share a label.

    Labels depend only on the set of (qid, pid) pairs, not on their order in the input.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    q_idx, q_ids = pd.factorize(pd.Series(qrels["qid"].to_numpy(), dtype=object), sort=True)
    p_idx, p_ids = pd.factorize(pd.Series(qrels["pid"].to_numpy(), dtype=object), sort=True)
    n = len(q_ids) + len(p_ids)
    graph = coo_matrix((np.ones(len(qrels), dtype=np.int8), (q_idx, len(q_ids) + p_idx)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels[q_idx]


def choose_sizes(
    src: str, n_pairs: int, n_passages: int, sized: list[str], rest: str, asked: dict[str, int | None],
    defaults: dict[str, int], per_split_corpus: bool,
) -> tuple[dict[str, int], dict[str, int], list[str]]:
    """(pairs per sized split, minimum passages per sized split, notes) for carving `n_pairs` pairs."""
    sized = [s for s in ("dev", "test") if s in sized]
    min_passages = dict.fromkeys(sized, 0)
    sizes = {s: asked[s] if asked[s] is not None else defaults[s] for s in sized}
    auto = [s for s in sized if asked[s] is None]
    notes: list[str] = []
    if auto and sum(sizes.values()) > n_pairs // 2:
        # Scaled down: a fifth for test, a tenth for dev, never above the defaults; where the test corpus
        # is the test pairs' passages, test keeps the passages 256-negative evaluation needs.
        keep = "test" in auto and per_split_corpus and defaults["test"] >= MIN_TEST_PASSAGES
        scaled = {"test": max(n_pairs // 5, MIN_TEST_PASSAGES if keep else 1), "dev": max(n_pairs // 10, 1)}
        why = {
            "test": f"a fifth of the pairs ({max(n_pairs // 5, 1):,})",
            "dev": f"a tenth of the pairs ({max(n_pairs // 10, 1):,})",
        }
        if keep:
            min_passages["test"] = MIN_TEST_PASSAGES
            why["test"] = (f"the larger of a fifth of the pairs ({n_pairs // 5:,}) and {MIN_TEST_PASSAGES}, as the"
                           f" test corpus needs {MIN_TEST_PASSAGES} passages for contrastive entropy with {EVAL_NEGATIVES} negatives")
        for s in auto:
            sizes[s] = min(defaults[s], scaled[s])
        default_text = " + ".join(f"{s}_size {defaults[s]:,}" for s in sized)
        chosen = "; ".join(f"{s}={sizes[s]:,} pairs ({why[s]})" for s in auto)
        notes.append(
            f"sizes: {src} has {n_pairs:,} unique pairs, too few for {default_text} (the defaults from"
            f" params.yaml's data section), which would leave {rest} under half of them; chose {chosen};"
            f" {rest} keeps the rest. Pass --dev-size/--test-size to choose other sizes"
        )
    need_passages = sum(min_passages.values())
    if sum(sizes.values()) >= n_pairs or (need_passages and need_passages >= n_passages):
        suggestion = f"--test-size {max(n_pairs // 5, 1)} --dev-size {max(n_pairs // 10, 1)}"
        if not auto:
            raise DrscalingError(
                f"{src}: {n_pairs:,} unique pairs (after de-duplication) are too few for "
                + " + ".join(f"{s}_size {sizes[s]:,}" for s in sized)
                + f" and at least one pair for {rest}; pass smaller sizes (e.g. {suggestion})"
            )
        if need_passages:
            raise DrscalingError(
                f"{src}: {n_pairs:,} unique pairs over {n_passages:,} passages are too few to split with sizes"
                f" that fit: the test split needs at least {MIN_TEST_PASSAGES} passages (a positive and {EVAL_NEGATIVES}"
                f" negatives for contrastive entropy) and dev and {rest} at least one pair each. To import anyway"
                f" pass both sizes (e.g. {suggestion}) and lower validate.min_test_corpus in params.yaml to the"
                " test corpus you get"
            )
        raise DrscalingError(
            f"{src}: {n_pairs:,} unique pairs are too few to give {', '.join(sized)} and {rest} a pair each;"
            " add judgements or map the splits to other sources with --split"
        )
    return sizes, min_passages, notes


def carve(
    qrels: pd.DataFrame, sizes: dict[str, int], min_passages: dict[str, int], rest: str, seed: int,
) -> dict[str, pd.DataFrame]:
    """Split `qrels` into the sized splits (exact pair counts where the groups allow) and `rest`.

    Groups are shuffled with `seed`; each goes to the first sized split (test before dev) it fits in,
    else to `rest`. A split still short of its minimum passages once its pairs are met keeps taking
    groups until it has them.
    """
    labels = groups_of(qrels)
    n_groups = int(labels.max()) + 1
    pairs_per_group = np.bincount(labels, minlength=n_groups)
    passages_per_group = (
        pd.DataFrame({"g": labels, "pid": qrels["pid"].to_numpy()}).drop_duplicates().groupby("g").size()
        .reindex(range(n_groups), fill_value=0).to_numpy()
    )
    order = np.random.default_rng(seed).permutation(n_groups)
    names = [s for s in ("test", "dev") if s in sizes]
    counts = dict.fromkeys(names, 0)
    passages = dict.fromkeys(names, 0)
    target = np.full(n_groups, len(names))  # index into names; len(names) = rest
    for g in order:
        size = int(pairs_per_group[g])
        for i, name in enumerate(names):
            fits = counts[name] + size <= sizes[name]
            short = counts[name] >= sizes[name] and passages[name] < min_passages[name]
            if fits or short:
                target[g] = i
                counts[name] += size
                passages[name] += int(passages_per_group[g])
                break
    row_target = target[labels]
    out = {name: qrels[row_target == i] for i, name in enumerate(names)}
    out[rest] = qrels[row_target == len(names)]
    return out


# ---------------------------------------------------------------------------------------------
# the whole build
# ---------------------------------------------------------------------------------------------


def build(
    coll: Collection, mapping: dict[str, str], dest: str | Path, *, dev_size: int | None, test_size: int | None,
    seed: int, defaults: dict[str, int] | None = None,
) -> ImportReport:
    """Carve, de-leak and write `coll` as a canonical dataset at `dest`; return the report.

    An error after reading carries the notes gathered so far (what was dropped on the way), since
    they usually explain it.
    """
    defaults = defaults or {"dev": 1000, "test": 1000}
    asked = {"dev": dev_size, "test": test_size}
    for name, value in asked.items():
        if value is not None and value < 1:
            raise DrscalingError(f"--{name}-size must be >= 1 (got {value})")
    notes = list(coll.notes)
    try:
        splits = _assemble(coll, mapping, asked, defaults, seed, notes)
    except DrscalingError as exc:
        if not notes:
            raise
        raise DrscalingError(f"{exc}; nothing was written. Dropped or chosen on the way:\n  " + "\n  ".join(notes)) from None
    test_corpus = len(splits["test"].corpus)
    if test_corpus < MIN_TEST_PASSAGES:
        notes.append(
            f"warning: the test corpus has {test_corpus:,} passages, fewer than {MIN_TEST_PASSAGES}: evaluation"
            f" with {EVAL_NEGATIVES} negatives needs more, and `drscaling validate` checks validate.min_test_corpus"
        )
    write_dataset(splits, dest)
    return ImportReport(
        {s: len(splits[s].qrels) for s in SPLITS}, Path(dest), {s: len(splits[s].corpus) for s in SPLITS}, notes
    )


def _assemble(coll: Collection, mapping: dict[str, str], asked: dict[str, int | None], defaults: dict[str, int],
              seed: int, notes: list[str]) -> dict[str, Split]:
    by_source: dict[str, list[str]] = {}
    for split in SPLITS:
        by_source.setdefault(mapping[split], []).append(split)
    assigned: dict[str, pd.DataFrame] = {}
    for src, members in by_source.items():
        source = coll.sources[src]
        qrels = source.qrels
        if qrels.empty:
            raise DrscalingError(f"{source.name}: no relevant judgements to import for {', '.join(members)}")
        if len(members) == 1:
            assigned[members[0]] = qrels
            if asked.get(members[0]) is not None:
                notes.append(f"--{members[0]}-size not used: {members[0]} is the whole of {source.name}"
                             " (sizes apply to splits carved out of a shared source)")
            continue
        rest = "train" if "train" in members else "test"
        sized = [s for s in ("test", "dev") if s in members and s != rest]
        sizes, min_passages, size_notes = choose_sizes(
            source.name, len(qrels), qrels["pid"].nunique(), sized, rest, asked, defaults,
            per_split_corpus=not coll.shared_corpus,
        )
        notes += size_notes
        parts = carve(qrels, sizes, min_passages, rest, seed)
        for s in sized:
            if len(parts[s]) < sizes[s] and not min_passages[s]:
                notes.append(
                    f"{s} got {len(parts[s]):,} pairs, not {sizes[s]:,}: the remaining groups (queries and passages"
                    " linked by judgements, kept in one split) were larger than the pairs left to fill"
                )
        if len(by_source) > 1 or rest != "train":
            notes.append(f"{' and '.join(sized)} carved out of {source.name} by query group; {rest} keeps the rest")
        assigned.update(parts)
    # The canonical format forbids a dev/test query or positive passage in train's judgements.
    held = pd.concat([assigned["dev"], assigned["test"]])
    train = assigned["train"]
    leak = train["qid"].isin(set(held["qid"])) | train["pid"].isin(set(held["pid"]))
    if leak.any():
        notes.append(
            f"dropped {int(leak.sum()):,} train judgement(s) whose query or passage is also judged in dev or"
            f" test (e.g. {train[leak].iloc[0]['qid']} -> {train[leak].iloc[0]['pid']}): no leak into train"
        )
        assigned["train"] = train[~leak]
    splits: dict[str, Split] = {}
    for split in SPLITS:
        qrels = assigned[split].reset_index(drop=True)
        if qrels.empty:
            raise DrscalingError(f"the {split} split has no judgements left (source {coll.sources[mapping[split]].name})")
        queries = coll.sources[mapping[split]].queries
        queries = queries[queries["qid"].isin(set(qrels["qid"]))].reset_index(drop=True)
        if coll.shared_corpus:
            corpus = coll.corpus
        else:
            corpus = coll.corpus[coll.corpus["pid"].isin(set(qrels["pid"]))].reset_index(drop=True)
        splits[split] = Split(corpus=corpus, queries=queries, qrels=qrels)
    return splits


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """`--split NAME=SOURCE` flags as {name: source}."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, source = item.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or name not in SPLITS or not source:
            raise DrscalingError(f"--split {item!r}: expected NAME=SOURCE with NAME one of {', '.join(SPLITS)}")
        if name in out:
            raise DrscalingError(f"--split names {name} twice")
        out[name] = source
    return out
