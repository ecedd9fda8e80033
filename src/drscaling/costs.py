"""Measured costs: inference on Triton ($ per token) and training from MLflow runs ($ per step).

Inference: `measure` drives every served model with a tritonclient load generator (asynchronous
gRPC requests from one thread, or one HTTP client per thread; bounded in time and count) over a
grid of (batch size, concurrency), `repeats` times per setting, records throughput and latency
percentiles (median over the repeats, and their spread) to MLflow and JSON, converts the best
median throughput of each model to $ per million tokens at the configured $ per device-hour, and
fits usd_per_token(N) = a * N**b across the measured shapes (least squares in log space; with one
shape b is fixed at 1) with an interval from the repeats (cost_stats.fit_power). Settings whose
repeats disagree by more than cost_stats.SPREAD_LIMIT, and a machine already loaded at the start,
are printed as warnings and listed in "flags".

Training: `training_costs` reads the training runs' median step time and tokens per step from
MLflow and fits usd_per_step(N) = a * N**b the same way.

The combined file (`measure_costs`, typed as costs_file.CostsFile) is what the budget module reads:
    {"device_hour_usd": float, "device": str, "measured_at": ISO time, "machine": {...},
     "repeats": int, "flags": [str],
     "inference": {"points": [{"shape", "n", "tokens_per_s", "usd_per_million_tokens",
                               "tokens_per_s_repeats", "tokens_per_s_spread"}],
                   "fit": {"a", "b"[, "interval"]}},   # usd per token = a * N**b
     "training":  {"points": [{"shape", "n", "step_s", "tokens_per_step", "usd_per_step", "runs"}],
                   "fit": {"a", "b"[, "interval"]}}}   # usd per step = a * N**b
"training" is absent when no training runs exist yet. The pipeline's copy is versioned data in git
(costs/costs.json, `make measure`), not a DVC stage output: timings are not reproducible.

Dual towers (models labelled `tower` = query / passage in their config, see drscaling.serving) are not
swept over the grid but measured at their own operating point: a query tower answers one query at
a time, so its cost is latency at batch 1 (concurrency 1 and under concurrent load); a passage
tower encodes the corpus in bulk, so its cost is throughput at batch `passage_batch`. The combined
file then also holds
    "towers": [{"tower": "query", "retriever", "model", "shape", "n", "seq_len", "batch": 1,
                "latency": [{"concurrency", "p50_ms", "p99_ms", "queries_per_s"}],
                "tokens_per_s", "usd_per_million_tokens"},     # best tokens/s over the concurrencies
               {"tower": "passage", "retriever", "model", "shape", "n", "seq_len", "batch",
                "concurrency", "passages_per_s", "tokens_per_s", "p50_ms", "p99_ms",
                "usd_per_million_tokens"}]
The inference fit is over the throughput points (shared models and passage towers); query towers
join it only when nothing else was measured.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from drscaling.cost_stats import SPREAD_LIMIT, fit_power, load_flags, machine_state, summarise_repeats
from drscaling.costs_file import CostFit, CostSection, CostsFile
from drscaling.errors import DrscalingError
from drscaling.files import finite_copy, to_json, write_json
from drscaling.loadgen import LoadConfig, run_load
from drscaling.serving import Client, TritonServer

# The paper's price: $3.93 per device-hour (an A100 on a public cloud at the time of writing).
DEFAULT_DEVICE_HOUR_USD = 3.93
STAGE_TAG = "drscaling.stage"


TOWER_KEYS = {
    "query": ("tower", "retriever", "model", "shape", "n", "seq_len", "batch", "latency", "tokens_per_s",
              "usd_per_million_tokens"),
    "passage": ("tower", "retriever", "model", "shape", "n", "seq_len", "batch", "concurrency",
                "passages_per_s", "tokens_per_s", "p50_ms", "p99_ms", "usd_per_million_tokens"),
}


@dataclass
class ServedModel:
    name: str
    shape: str
    n: int  # non-embedding parameters
    tower: str = "shared"  # "query" / "passage": one tower of a dual pair, measured at its operating point
    retriever: str = ""


# ---------------------------------------------------------------------------------------------
# Prices and the machine
# ---------------------------------------------------------------------------------------------


def usd_per_million_tokens(tokens_per_s: float, device_hour_usd: float) -> float:
    return device_hour_usd / 3600.0 / tokens_per_s * 1e6


def device_description() -> str:
    """What the measurements ran on (the client host; the server shares it for a local Triton)."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU {model} x{os.cpu_count()} ({platform.system()})"


def served_models(url: str | TritonServer, protocol: str = "http") -> list[ServedModel]:
    """Every ready tensor model on the server, with shape and N from its config (build_model_repository
    writes them); text ensembles and their tokenizers are left out."""
    with Client(url, protocol) as client:
        models = []
        for name in client.ready_models():
            info = client.info(name)
            if info.interface != "tensor":  # <name>-text / -tokenizer: the ensemble around a tensor model
                continue
            models.append(ServedModel(name, info.params.get("shape", name),
                                      int(info.params.get("n_non_embedding", 0)), info.tower,
                                      info.retriever))
    return models


def _as_models(models) -> list[ServedModel]:
    out = []
    for m in models:
        if isinstance(m, ServedModel):
            out.append(m)
        elif isinstance(m, dict):
            out.append(ServedModel(m["name"], m["shape"], int(m["n"]), m.get("tower", "shared"),
                                   m.get("retriever", "")))
        else:
            out.append(ServedModel(*m[:3], *m[3:]))
    for m in out:
        m.n = int(m.n)
        if m.tower not in ("shared", "query", "passage"):
            raise DrscalingError(f"model '{m.name}': tower must be shared, query or passage (got '{m.tower}')")
    for m in out:
        if m.n <= 0:
            raise DrscalingError(f"model '{m.name}': N (non-embedding parameters) must be > 0")
    return out


@contextlib.contextmanager
def _mlflow_run(name: str, tags: dict[str, str]) -> Iterator[object]:
    """The active run if there is one (a stage calling us), else a run of our own."""
    from drscaling import tracking

    tracking.configure()
    import mlflow

    if mlflow.active_run() is not None:
        yield mlflow.active_run()
        return
    with mlflow.start_run(run_name=name, tags=tags) as run:
        yield run


def measure(
    url_or_server: str | TritonServer, models: Sequence | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32), concurrency: Sequence[int] = (1, 8),
    duration_s: float = 5.0, seq_len: int = 64,
    device_hour_usd: float = DEFAULT_DEVICE_HOUR_USD, out_path: str | Path | None = None,
    protocol: str = "grpc", warmup_s: float = 0.5, max_requests: int = 100_000,
    device: str | None = None, log_mlflow: bool = True, query_seq_len: int = 32,
    query_concurrency: Sequence[int] = (1, 8), passage_batch: int = 32, passage_seq_len: int = 128,
    passage_concurrency: Sequence[int] = (1,), repeats: int = 3, max_spread: float = SPREAD_LIMIT,
) -> dict:
    """Load-sweep each model ([(name, shape, n[, tower, retriever])], or None: every ready model
    on the server, towers labelled from their configs), every setting `repeats` times.

    Returns {"device_hour_usd", "device", "measured_at", "machine", "flags", "load": {...},
    "sweep": {model: [cells]}, "inference": {"points", "fit"}, "towers": [...]} and writes it to
    out_path (atomically) when given. A cell holds the medians over its repeats, their spread and
    flags (cost_stats.summarise_repeats). Each model's cost point uses its best median tokens/s over
    its cells (the operating point you would pick). Query and passage towers are measured at their
    own cells (LoadConfig.cells).
    """
    cfg = LoadConfig(tuple(batch_sizes), tuple(concurrency), float(duration_s), float(warmup_s),
                     int(seq_len), int(max_requests), protocol, int(query_seq_len),
                     tuple(query_concurrency), int(passage_batch), int(passage_seq_len),
                     tuple(passage_concurrency), int(repeats), float(max_spread))
    cfg.validate()
    if device_hour_usd <= 0:
        raise DrscalingError(f"device_hour_usd must be > 0 (got {device_hour_usd})")
    served = served_models(url_or_server, protocol) if models is None else _as_models(models)
    if not served:
        raise DrscalingError("no models to measure (the server has none ready)")
    _check_servable(url_or_server, served, cfg)
    start = machine_state()
    result: dict = {
        "device_hour_usd": float(device_hour_usd), "device": device or device_description(),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(start), "flags": _warn(load_flags(start)),
        "load": asdict(cfg), "sweep": {}, "inference": {"points": []}, "towers": [],
    }
    ctx = _mlflow_run("measure", {STAGE_TAG: "measure"}) if log_mlflow else contextlib.nullcontext()
    with ctx:
        swept = _sweep_repeated(url_or_server, served, cfg)
        query_points = []
        for m in served:
            cells = swept[m.name]
            result["flags"] += _warn([f for c in cells for f in c["flags"]])
            best = max(cells, key=lambda x: x["tokens_per_s"])
            result["sweep"][m.name] = cells
            point = {
                "shape": m.shape, "n": m.n, "tokens_per_s": best["tokens_per_s"],
                "usd_per_million_tokens": usd_per_million_tokens(best["tokens_per_s"], device_hour_usd),
                "tokens_per_s_repeats": best["per_repeat"]["tokens_per_s"],
                "tokens_per_s_spread": best["spread"]["tokens_per_s"]["rel"],
            }
            # Query towers are measured at batch 1 (latency): not a throughput point for the fit.
            (query_points if m.tower == "query" else result["inference"]["points"]).append(point)
            tower = tower_entry(m, cells, point) if m.tower != "shared" else None
            if tower is not None:
                result["towers"].append(tower)
            if log_mlflow:
                _log_model_sweep(m, cells, cfg, point, tower)
        if not result["inference"]["points"]:
            result["inference"]["points"] = query_points
        result["inference"]["fit"] = _inference_fit(result["inference"]["points"], device_hour_usd)
        result["machine"]["loadavg_1m_end"] = machine_state()["loadavg_1m"]
        if log_mlflow:
            _log_measure(result)
    if not result["towers"]:
        del result["towers"]
    if out_path is not None:
        write_json(out_path, finite_copy(result))  # a degenerate fit's NaN as null: strict JSON
    return result


def _check_servable(url_or_server, served: list[ServedModel], cfg: LoadConfig) -> None:
    """Every model ready, and every cell's sequence within its model's positions (before any timing)."""
    with Client(url_or_server, cfg.protocol) as client:
        for m in served:
            client.check_ready(m.name)
            limit = client.info(m.name)
            longest = max(s for _, _, s in cfg.cells(m.tower))
            if longest > limit.max_sequence_length:
                raise DrscalingError(
                    f"seq_len {longest} exceeds the {limit.max_sequence_length} positions of "
                    f"model '{m.name}'"
                )


def machine_description(state: dict) -> dict:
    """What the measurements ran on and how busy it was: kept with the costs they explain."""
    return {"device": device_description(), "platform": platform.platform(),
            "python": platform.python_version(), "usable_cpus": state["usable_cpus"],
            "loadavg_1m_start": state["loadavg_1m"]}


def _warn(flags: list[str]) -> list[str]:
    for flag in flags:
        print(f"warning: {flag}")
    return flags


def _sweep_repeated(url_or_server, served: list[ServedModel], cfg: LoadConfig) -> dict[str, list[dict]]:
    """Every model's cells, each measured cfg.repeats times and summarised (medians, spread, flags).

    The repeats go round the whole grid (every model, every cell) instead of back to back: a burst
    of load from elsewhere then slows one repeat of many settings, which the median discards,
    instead of every repeat of one model (a rerun under load once put minilm-L3 below minilm-L4)."""
    plan = [(m, i, cell) for m in served for i, cell in enumerate(cfg.cells(m.tower))]
    runs: dict[str, list[list[dict]]] = {m.name: [[] for _ in cfg.cells(m.tower)] for m in served}
    with tqdm(total=len(plan) * cfg.repeats, desc="measure", leave=False) as bar:
        for _ in range(cfg.repeats):
            for m, i, (b, c, s) in plan:
                bar.set_postfix_str(f"{m.name} batch {b} x {c}")
                runs[m.name][i].append(run_load(url_or_server, m.name, b, c, cfg, seq_len=s))
                bar.update()
    return {m.name: [summarise_repeats(r, cfg.max_spread, m.name) for r in runs[m.name]] for m in served}


def _inference_fit(points: list[dict], device_hour_usd: float) -> dict:
    """$/token = a * N**b over the points, its interval from each point's repeats."""
    return fit_power([p["n"] for p in points], [p["usd_per_million_tokens"] / 1e6 for p in points],
                     samples=[[usd_per_million_tokens(t, device_hour_usd) / 1e6 for t in p["tokens_per_s_repeats"]]
                              for p in points])


def _log_measure(result: dict) -> None:
    import mlflow

    fit = result["inference"]["fit"]
    mlflow.log_metrics({"inference_fit_a": fit["a"], "inference_fit_b": fit["b"],
                        "flags": len(result["flags"]), "loadavg_1m_start": result["machine"]["loadavg_1m_start"]})
    if "b" in fit.get("interval", {}):
        mlflow.log_metrics({"inference_fit_b_low": fit["interval"]["b"][0],
                            "inference_fit_b_high": fit["interval"]["b"][1]})
    mlflow.set_tag("drscaling.flags", "; ".join(result["flags"])[:5000] or "none")
    mlflow.log_text(to_json(finite_copy(result)), "costs/inference_sweep.json")


def tower_entry(m: ServedModel, cells: list[dict], point: dict) -> dict:
    """A tower's cost record (the "towers" list of the costs file; keys in TOWER_KEYS)."""
    base = {"tower": m.tower, "retriever": m.retriever or m.name, "model": m.name, "shape": m.shape,
            "n": m.n, "seq_len": cells[0]["seq_len"], "batch": cells[0]["batch"],
            "tokens_per_s": point["tokens_per_s"],
            "usd_per_million_tokens": point["usd_per_million_tokens"]}
    if m.tower == "query":
        # One query per request: inferences/s is queries/s.
        return base | {"latency": [{"concurrency": c["concurrency"], "p50_ms": c["p50_ms"],
                                    "p99_ms": c["p99_ms"], "queries_per_s": c["inferences_per_s"]}
                                   for c in cells]}
    best = max(cells, key=lambda x: x["tokens_per_s"])
    return base | {"concurrency": best["concurrency"], "passages_per_s": best["inferences_per_s"],
                   "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"]}


def _log_model_sweep(m: ServedModel, cells: list[dict], cfg: LoadConfig, point: dict,
                     tower: dict | None = None) -> None:
    """One nested run per model; each (batch, concurrency) cell is a step of its metrics."""
    import mlflow

    with mlflow.start_run(run_name=f"measure-{m.name}", nested=True,
                          tags={STAGE_TAG: "measure", "drscaling.model": m.name,
                                "drscaling.tower": m.tower}):
        mlflow.log_params({"model": m.name, "shape": m.shape, "n_non_embedding": m.n,
                           "seq_len": cells[0]["seq_len"], "protocol": cfg.protocol,
                           "duration_s": cfg.duration_s, "repeats": cfg.repeats, "tower": m.tower,
                           "retriever": m.retriever or m.name})
        for step, cell in enumerate(cells):
            mlflow.log_metrics({
                "batch": cell["batch"], "concurrency": cell["concurrency"],
                "inferences_per_s": cell["inferences_per_s"], "tokens_per_s": cell["tokens_per_s"],
                "p50_ms": cell["p50_ms"], "p95_ms": cell["p95_ms"], "p99_ms": cell["p99_ms"],
                "tokens_per_s_spread": cell["spread"]["tokens_per_s"]["rel"],
            }, step=step)
            # Also one flat metric per cell, so the UI can compare cells across models directly.
            key = f"b{cell['batch']}_c{cell['concurrency']}"
            mlflow.log_metrics({f"{key}_tokens_per_s": cell["tokens_per_s"],
                                f"{key}_tokens_per_s_spread": cell["spread"]["tokens_per_s"]["rel"],
                                f"{key}_p99_ms": cell["p99_ms"]})
        mlflow.log_metrics({"best_tokens_per_s": point["tokens_per_s"],
                            "usd_per_million_tokens": point["usd_per_million_tokens"]})
        if tower is not None and m.tower == "query":
            for lat in tower["latency"]:
                c = lat["concurrency"]
                mlflow.log_metrics({f"query_p50_ms_c{c}": lat["p50_ms"], f"query_p99_ms_c{c}": lat["p99_ms"],
                                    f"queries_per_s_c{c}": lat["queries_per_s"]})
        elif tower is not None:
            mlflow.log_metrics({"passages_per_s": tower["passages_per_s"],
                                "passage_tokens_per_s": tower["tokens_per_s"]})


# ---------------------------------------------------------------------------------------------
# Training cost
# ---------------------------------------------------------------------------------------------


def training_costs(
    experiment_name: str | None = None, runs: Sequence | None = None,
    device_hour_usd: float = DEFAULT_DEVICE_HOUR_USD, preset: str | None = None,
) -> dict:
    """$ per training step per shape from MLflow training runs, and usd_per_step(N) = a * N**b.

    Reads runs tagged drscaling.stage=train (from `experiment_name`, or all experiments when
    None) or the given `runs` (run ids or mlflow Run objects). Several runs of one shape (other
    D or seeds) are pooled by the median step time. Raises DrscalingError if none exist.
    """
    from drscaling import tracking

    tracking.configure()
    import mlflow

    if device_hour_usd <= 0:
        raise DrscalingError(f"device_hour_usd must be > 0 (got {device_hour_usd})")
    client = mlflow.MlflowClient()
    if runs is not None:
        found = [client.get_run(r) if isinstance(r, str) else r for r in runs]
    else:
        if experiment_name is not None:
            exp = client.get_experiment_by_name(experiment_name)
            if exp is None:
                raise DrscalingError(
                    f"no MLflow experiment '{experiment_name}': train first (drscaling train)"
                )
            exp_ids = [exp.experiment_id]
        else:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        # One preset's runs share a step shape (batch, negatives, lengths): pooling runs of other
        # presets would mix $/step of different steps.
        where = f"tags.`{STAGE_TAG}` = 'train'" + (f" and tags.preset = '{preset}'" if preset else "")
        found = client.search_runs(exp_ids, filter_string=where, max_results=50_000) if exp_ids else []
    per_shape: dict[str, dict] = {}
    for run in found:
        if run.data.tags.get(STAGE_TAG) != "train":
            continue
        p, m = run.data.params, run.data.metrics
        if "shape" not in p or "n_non_embedding" not in p:
            continue
        if "train_step_seconds" not in m or "train_tokens_per_step" not in m:
            continue  # an unfinished or failed run: it has no timing to contribute
        d = per_shape.setdefault(p["shape"], {"n": int(p["n_non_embedding"]), "step_s": [],
                                              "tokens": []})
        d["step_s"].append(float(m["train_step_seconds"]))
        d["tokens"].append(float(m["train_tokens_per_step"]))
    if not per_shape:
        where = f"experiment '{experiment_name}'" if experiment_name else "the MLflow store"
        raise DrscalingError(
            f"no finished training runs (tag {STAGE_TAG}=train with train_step_seconds) in "
            f"{where}: train first (drscaling train / dvc repro train)"
        )
    points, samples = [], []
    for shape, d in sorted(per_shape.items(), key=lambda kv: kv[1]["n"]):
        step_s = statistics.median(d["step_s"])
        points.append({"shape": shape, "n": d["n"], "step_s": step_s,
                       "tokens_per_step": statistics.median(d["tokens"]),
                       "usd_per_step": step_s * device_hour_usd / 3600.0, "runs": len(d["step_s"])})
        # The runs of one shape (other D, other sweeps) are its repeats: they give the fit's interval.
        samples.append([x * device_hour_usd / 3600.0 for x in d["step_s"]])
    fit = fit_power([p["n"] for p in points], [p["usd_per_step"] for p in points], samples=samples)
    return {"points": points, "fit": fit}


# ---------------------------------------------------------------------------------------------
# The combined file
# ---------------------------------------------------------------------------------------------


INFERENCE_POINT_KEYS = ("shape", "n", "tokens_per_s", "usd_per_million_tokens", "tokens_per_s_repeats",
                        "tokens_per_s_spread")
TRAINING_POINT_KEYS = ("shape", "n", "step_s", "tokens_per_step", "usd_per_step", "runs")


def _section(part: dict, keys: tuple[str, ...]) -> CostSection:
    fit = part["fit"]
    return CostSection(points=[{k: p[k] for k in keys if k in p} for p in part["points"]],
                       fit=CostFit(float(fit["a"]), float(fit["b"]), fit.get("interval")))


def combine(measured: dict, training: dict | None) -> CostsFile:
    """Keep exactly the contract's keys (the budget module reads this), with when, where and how
    reliably it was measured (a versioned costs file must say what machine its numbers are from)."""
    return CostsFile(
        device_hour_usd=float(measured["device_hour_usd"]),
        device=str(measured["device"]),
        measured_at=measured.get("measured_at"),
        machine=measured.get("machine", {}),
        repeats=measured.get("load", {}).get("repeats", 1),
        duration_s=measured.get("load", {}).get("duration_s"),
        flags=list(measured.get("flags", [])),
        inference=_section(measured["inference"], INFERENCE_POINT_KEYS),
        training=None if training is None else _section(training, TRAINING_POINT_KEYS),
        towers=[{k: t[k] for k in TOWER_KEYS[t["tower"]]} for t in measured.get("towers") or []],
    )


def measure_costs(
    url_or_server: str | TritonServer, out_path: str | Path, models: Sequence | None = None,
    experiment_name: str | None = None, device_hour_usd: float = DEFAULT_DEVICE_HOUR_USD,
    sweep_path: str | Path | None = None, preset: str | None = None, runs: Sequence | None = None,
    **load: object,
) -> dict:
    """Inference sweep + training costs -> the combined costs JSON at out_path (atomic).

    `load` takes measure()'s keywords (batch_sizes, concurrency, duration_s, seq_len, protocol,
    warmup_s, max_requests, device). Without training runs the inference part is still written,
    "training" is left out and a note is printed.
    """
    measured = measure(url_or_server, models, device_hour_usd=device_hour_usd,
                       out_path=sweep_path, **load)  # type: ignore[arg-type]
    try:
        training = training_costs(experiment_name, runs=runs, device_hour_usd=device_hour_usd, preset=preset)
    except DrscalingError as exc:
        print(f"note: training costs left out: {exc}")
        training = None
    costs = combine(measured, training)
    costs.write(out_path)
    return costs.to_dict()
