"""The data a run trains on: the first D annotated pairs of a seeded permutation, the train corpus its
negatives are drawn from, and the version of all it depends on (data_key), so a run on changed data is
another run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drscaling import tracking
from drscaling.annotation.format import load_annotations
from drscaling.checkpoints import Start, resolve_start
from drscaling.data import Corpus, load_split
from drscaling.errors import DrscalingError
from drscaling.model.tokenizer import uses_shared_tokenizer
from drscaling.train.config import Paths, TrainConfig

def training_pairs(paths: Paths, source: str, train_pairs: int, seed: int) -> tuple[list[str], list[str], list[str], Corpus]:
    """(queries, positive pids, positive passages, the train corpus) for the first D pairs of a seeded
    permutation: smaller D are subsets of larger ones, as in a data-size sweep. D = 0: all pairs.
    The corpus is read lean: a step reads its negatives' texts from the file, not from 8.8M strings."""
    ann_path = paths.annotations / f"{source}.jsonl"
    ann = load_annotations(ann_path)
    corpus = load_split(paths.prepared, "train", lean=True).corpus
    check_annotations_match(ann, corpus, ann_path, paths.prepared)
    available = len(ann)
    d = train_pairs or available
    if d > available:
        raise DrscalingError(f"train_pairs={d} but source '{source}' has only {available} pairs")
    if d < 1:
        raise DrscalingError("train_pairs must be >= 1")
    order = np.random.default_rng(seed).permutation(available)[:d]
    ann = ann.iloc[order]
    return list(ann["query"]), list(ann["pid"]), corpus.texts(corpus.index_of(ann["pid"])), corpus


def check_annotations_match(ann, corpus: Corpus, ann_path: Path, prepared: Path) -> None:
    """Every annotation must name a passage of the train corpus it is trained against: one that does
    not was made from another dataset (or another import of it), and training on the rest would
    silently measure something else."""
    unknown = corpus.index_of(ann["pid"]) < 0
    if unknown.any():
        corpus_file = Path(prepared) / "train" / "corpus.jsonl"
        raise DrscalingError(
            f"{ann_path}: {int(unknown.sum()):,} of {len(ann):,} annotations name passages that are not in the "
            f"train corpus {corpus_file} (e.g. pid {ann.loc[unknown, 'pid'].iloc[0]!r}): the annotations were "
            f"made from another dataset. Annotate this one (`drscaling annotate --source <source> --prepared "
            f"{prepared} --out <folder>/<source>.jsonl`) and pass that folder as --annotations")


@dataclass
class TrainingData:
    """A run's training data: the pairs, the corpus negatives are drawn from, and its version."""

    queries: list[str]
    pos_texts: list[str]
    corpus: Corpus  # the train corpus negatives are drawn from (texts read per step)
    pos_idx: np.ndarray  # each pair's positive as an index into corpus
    versions: dict[str, str]  # content hashes of the annotations, the prepared splits (and shared tokenizer)
    key: str  # data_key: those hashes, plus a named init checkpoint's


def training_data(cfg: TrainConfig, paths: Paths, start: Start) -> TrainingData:
    queries, pos_pids, pos_texts, corpus = training_pairs(paths, cfg.annotation_source, cfg.train_pairs, cfg.seed)
    versions = data_versions(paths, cfg.annotation_source, start)
    return TrainingData(queries, pos_texts, corpus, corpus.index_of(pos_pids), versions,
                 _joined(versions, start))


def data_versions(paths: Paths, source: str, start: Start | None = None) -> dict[str, str]:
    """Content hashes of a run's annotations and of the prepared splits (hashed once per call), and of
    the shared tokenizer when the run tokenises with it (a BERT shape from config: a new vocabulary is
    other data). Runs on their checkpoint's own tokenizer (minilm, LLMs, a named init) have no
    tokenizer_version, so their keys do not move when the shared tokenizer does."""
    versions = {"annotations_version": tracking.file_version(paths.annotations / f"{source}.jsonl"),
                "prepared_version": tracking.file_version(paths.prepared)}
    if start is not None and uses_shared_tokenizer(start.shape, start.load or ""):
        versions["tokenizer_version"] = tracking.file_version(paths.tokenizer)
    return versions


def data_key(paths: Paths, source: str, start: Start | None = None, versions: dict[str, str] | None = None) -> str:
    """The version of the data a run trains on: its annotations and prepared splits, the shared
    tokenizer where it uses it, plus a named init checkpoint's weights (other weights under the same
    name are another run). Without `start`: the annotations and splits alone (a node's data check).
    `versions`: data_versions(paths, source, start) when already hashed (a sweep hashes once)."""
    return _joined(versions or data_versions(paths, source, start), start)


def run_data_key(paths: Paths, cfg: TrainConfig, start: Start | None = None) -> str:
    """The data_key train() records for the run `cfg` describes (`start`: its resolved checkpoint)."""
    return data_key(paths, cfg.annotation_source, start or resolve_start(cfg.shape, cfg.init))


def _joined(versions: dict[str, str], start: Start | None) -> str:
    return (versions["annotations_version"] + versions["prepared_version"] + versions.get("tokenizer_version", "")
            + (start.digest if start and start.load else ""))
