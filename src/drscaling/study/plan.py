"""Sizing a study to its data: split sizes, evaluation negatives, and the sweeps the data can supply.

A preset (pipelines/<name>.yaml) is written for a large dataset: 256 evaluation negatives (so the
dev and test pools need 257 passages) and data sizes up to 400 pairs. A user's dataset of a few
hundred pairs cannot give that, so the study adapts, and says what it changed and why:

- split sizes: the importer's own defaults (params.yaml data.dev_size/test_size, scaled down for
  small data) when they leave dev and test 257 passages each; else dev and test a sixth of the pairs
  each (at most 257), so train keeps two thirds;
- evaluation negatives: the smaller held-out pool minus its largest set of positives, at most the
  configured 256 (fewer negatives lower chance, ln(K + 1); the budget flags against that K);
- data sizes: values above what the train split has are dropped and replaced by all of it;
- a sweep whose law would get too few distinct points is dropped (the fit would skip it anyway).

A dataset too small for any law stops here, before any training, with the number of pairs it needs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from drscaling.dataset.build import MIN_TEST_PASSAGES
from drscaling.errors import DrscalingError
from drscaling.laws.forms import registered_forms
from drscaling.sweep import Preset, merged, trained_shapes

# Fewer negatives than this make contrastive entropy too coarse to order models (chance ln 32 = 3.47).
MIN_EVAL_NEGATIVES = 31
SWEEP_AXES = {"model": "N", "data": "D", "source": "D", "joint": "N+D"}


@dataclass
class Plan:
    preset: Preset  # the adapted preset (its name: the study's)
    negatives: int  # evaluation negatives K
    notes: list[str] = field(default_factory=list)  # what was adapted, and why
    sweeps: list[str] = field(default_factory=list)  # sweeps left with enough points for their law


def held_out_sizes(n_pairs: int, defaults: dict[str, int]) -> tuple[int, int] | None:
    """(dev, test) pairs for a pairs file of `n_pairs` unique pairs, or None to let the importer choose
    (its defaults, as build.choose_sizes scales them, give both pools 257 passages)."""
    dev, test = defaults["dev"], defaults["test"]
    if dev + test > n_pairs // 2:  # the importer scales down: a tenth for dev, a fifth for test
        dev, test = min(dev, n_pairs // 10), min(test, max(n_pairs // 5, MIN_TEST_PASSAGES))
    if min(dev, test) >= MIN_TEST_PASSAGES and dev + test <= n_pairs // 2:
        return None
    size = max(1, min(MIN_TEST_PASSAGES, n_pairs // 6))
    return size, size


def eval_negatives(pools: dict[str, tuple[int, int]], configured: int) -> tuple[int, list[str]]:
    """K from {split: (passages, most positives of one query)}: the largest the smaller pool allows."""
    room = {s: passages - worst for s, (passages, worst) in pools.items()}
    k = min(configured, *room.values())
    notes = []
    if k < configured:
        tight = min(room, key=room.get)
        notes.append(f"evaluation negatives: {k} instead of {configured}: the {tight} pool has {pools[tight][0]:,} "
                     f"passages (chance is now ln({k} + 1) = {math.log(k + 1):.2f} nats, not "
                     f"{math.log(configured + 1):.2f}); more pairs give more")
    return k, notes


def _min_points(axes: str) -> int:
    forms = registered_forms(axes)
    return min(f.n_params for f in forms) + 1 if forms else math.inf


def _fit_d(values: list[int], available: int, where: str, notes: list[str]) -> list[int]:
    """The data sizes `available` pairs can supply: larger ones replaced by all of them."""
    if available < 1:
        return []
    kept = sorted({v for v in values if 0 < v <= available} | ({available} if 0 in values else set()))
    dropped = [v for v in values if v > available]
    if dropped:
        kept = sorted(set(kept) | {available})
        notes.append(f"{where}: D = {', '.join(map(str, dropped))} dropped (the train split has {available:,} "
                     f"pairs), D = {available:,} (all of them) added")
    return kept


def _adapt(preset: Preset, available: dict[str, int], notes: list[str]) -> Preset:
    out = copy.deepcopy(preset)
    if out.model:
        d = out.model.get("train_pairs", 0)
        if d > available["human"]:
            notes.append(f"model sweep: D = {d} lowered to {available['human']:,} (all train pairs)")
            out.model["train_pairs"] = available["human"]
    if out.data:
        out.data["train_pairs"] = _fit_d(out.data.get("train_pairs", []), available["human"], "data sweep", notes)
    if out.source:
        sources = [s for s in out.source.get("sources", []) if s in available]
        skipped = [s for s in out.source.get("sources", []) if s not in available]
        if skipped:
            notes.append(f"source sweep: {', '.join(skipped)} left out (not annotated in this study; "
                         "pass --sources to add them)")
        if sources:
            low = min(available[s] for s in sources)
            out.source["sources"] = sources
            out.source["train_pairs"] = _fit_d(out.source.get("train_pairs", []), low, "source sweep", notes)
        else:
            out.source = {}
    if out.joint:
        out.joint["train_pairs"] = _fit_d(out.joint.get("train_pairs", []), available["human"], "joint sweep", notes)
    return out


def _law_points(preset: Preset, sweep: str) -> tuple[int, int, int]:
    """(distinct N, distinct D, points) of one sweep."""
    body = getattr(preset, sweep)
    if sweep == "model":
        return len(set(body.get("shapes", []))), 1, len(set(body.get("shapes", [])))
    ds = set(body.get("train_pairs", []))
    if sweep == "joint":
        shapes = set(body.get("shapes", []))
        return len(shapes), len(ds), len(shapes) * len(ds)
    return 1, len(ds), len(ds) if body.get("shape") and (sweep == "data" or body.get("sources")) else 0


def supported(preset: Preset) -> dict[str, str | None]:
    """{sweep: None if its law gets enough points, else why not} for the sweeps the preset has."""
    out: dict[str, str | None] = {}
    for sweep, axes in SWEEP_AXES.items():
        if not getattr(preset, sweep):
            continue
        n, d, points = _law_points(preset, sweep)
        need = _min_points(axes)
        if axes == "N+D" and (n < 2 or d < 2):
            out[sweep] = f"needs >= 2 shapes and >= 2 data sizes (has {n} and {d})"
        elif points < need:
            out[sweep] = f"{points} distinct point(s), its law needs {need}"
        else:
            out[sweep] = None
    return out


def train_room(train: dict, corpus: int) -> str | None:
    """Why the train corpus is too small for the preset's training settings, or None."""
    need = int(train.get("negatives", 256)) + int(train.get("batch_size", 32))
    if corpus < need:
        return (f"the train split has {corpus:,} passages, too few for {train.get('negatives')} training negatives "
                f"plus a batch of {train.get('batch_size')} ({need})")
    return None


def plan_sweeps(preset: Preset, name: str, base_train: dict, available: dict[str, int], train_corpus: int,
                negatives: int) -> Plan:
    """The preset sized to the data; raises when no law is left."""
    notes: list[str] = []
    train = merged(base_train, preset.train)
    problems = [p for p in (train_room(train, train_corpus),) if p]
    if negatives < MIN_EVAL_NEGATIVES:
        problems.append(f"the held-out pools allow {negatives} evaluation negatives, fewer than {MIN_EVAL_NEGATIVES}")
    adapted = _adapt(preset, available, notes)
    adapted.name = name
    verdict = supported(adapted)
    for sweep, why in verdict.items():
        if why:
            notes.append(f"{sweep} sweep dropped: {why}")
            setattr(adapted, sweep, {})
    # a dropped sweep's shapes take their per-shape settings with them
    adapted.shape_train = {k: v for k, v in adapted.shape_train.items() if k in trained_shapes(adapted)}
    sweeps = [s for s, why in verdict.items() if why is None]
    if not sweeps:
        problems.append("no sweep has enough points for its law (" + "; ".join(
            f"{s}: {w}" for s, w in verdict.items()) + ")")
    if problems:
        raise TooSmall(problems)
    if "joint" not in sweeps:
        notes.append("no joint sweep: the laws are fitted, but the budget answer (which needs L(N, D)) is skipped")
    return Plan(preset=adapted, negatives=negatives, notes=notes, sweeps=sweeps)


class TooSmall(DrscalingError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def pairs_needed(preset: Preset, base_train: dict, configured_negatives: int, defaults: dict[str, int],
                 limit: int = 1_000_000) -> int | None:
    """The fewest unique pairs (one query per passage) for which plan_sweeps succeeds, or None."""

    def ok(n: int) -> bool:
        sizes = held_out_sizes(n, defaults) or (defaults["dev"], defaults["test"])
        train = n - sum(sizes)
        if train < 1:
            return False
        k = min(configured_negatives, min(sizes) - 1)
        try:
            plan_sweeps(preset, preset.name, base_train, {"human": train, "ict": train}, train, k)
        except TooSmall:
            return False
        return True

    lo, hi = 1, 64
    while not ok(hi):
        if hi >= limit:
            return None
        lo, hi = hi, hi * 2
    while lo + 1 < hi:  # feasibility grows with the data: bisect to the first n that works
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
