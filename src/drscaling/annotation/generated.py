"""The generated sources' entry points: generate (resumable, priced, tracked) or take the shipped
pre-generated file. Both hand back Annotations for publishing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from drscaling.annotation.checks import publish
from drscaling.annotation.config import FinetuneConfig, GenerationConfig, Generator, digest
from drscaling.annotation.endpoint import EndpointGenerator, redact_url
from drscaling.annotation.finetune import finetune_generator
from drscaling.annotation.format import Annotations, companion, cost_path
from drscaling.annotation.local import LocalGenerator
from drscaling.annotation.pricing import carried_over, price
from drscaling.annotation.prompts import DEFAULT_MAX_NEW_TOKENS, PROMPTS, resolve_prompt
from drscaling.annotation.resumable import partial_path, remove_partial, run_generation, target_passages
from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.files import finite_or_null, read_json, read_jsonl, to_json
from drscaling.weights import DEFAULT_MODEL

GENERATED_SOURCES = ("llm", "supervised")
SETTINGS_KEYS = ("prompt", "seed", "max_new_tokens", "max_passage_tokens", "do_sample", "temperature",
                 "top_p", "pick", "copy_min_words", "max_retries")


def _check_source(source: str) -> None:
    if source not in GENERATED_SOURCES:
        raise DrscalingError(f"source must be one of {', '.join(GENERATED_SOURCES)} (got {source!r})")


def annotate_generated(
    source: str, prepared: str | Path, out: str | Path, config: GenerationConfig | None = None,
    finetune: FinetuneConfig | None = None, generator_dir: str | Path | None = None,
    generator: Generator | None = None, track: bool = True, report: str | Path | None = None,
) -> dict:
    """Generate (generated_annotations), then publish `out` and its cost JSON once they pass the
    GX checks (report: `report`, default <out>.validation.json); the partial run is removed only
    then. Returns the cost dict."""
    ann = generated_annotations(source, prepared, out, config, finetune, generator_dir, generator, track)
    publish(out, ann, prepared, report or companion(out, ".validation.json"))
    return ann.cost


def generated_annotations(
    source: str, prepared: str | Path, out: str | Path, config: GenerationConfig | None = None,
    finetune: FinetuneConfig | None = None, generator_dir: str | Path | None = None,
    generator: Generator | None = None, track: bool = True,
) -> Annotations:
    """Annotate the train split's positive passages with generated queries (resumable in
    <out>.partial.jsonl); the pairs and cost, not yet written.

    source="llm": config.endpoint set -> chat-completions endpoint (config.model is the served
    model name); otherwise the local model config.model.
    source="supervised": when config.model is the default or `finetune` is given, fine-tune
    finetune.base_model into `generator_dir` (default: <out without .jsonl>-generator/, reused
    when its settings match) and generate with it; otherwise config.model is taken as an already
    trained generator (a folder, or castorini/doc2query-t5-base-msmarco online).
    `generator` injects a ready Generator (tests, benchmarks); `track=False` skips MLflow."""
    _check_source(source)
    cfg = config or GenerationConfig()
    if cfg.batch_size < 1 or cfg.max_retries < 0 or cfg.max_passage_tokens < 1:
        raise DrscalingError("batch_size and max_passage_tokens must be >= 1, max_retries >= 0")
    out = Path(out)
    passages = target_passages(prepared, cfg.limit, cfg.seed)
    cfg, model, finetune_info = _supervised_generator(source, prepared, out, cfg, finetune, generator_dir, passages["pid"])
    generator, kind = _generator(source, model, cfg, generator)
    settings = {k: getattr(cfg, k) for k in SETTINGS_KEYS} | {
        "source": source, "model": model, "prompt_kind": kind, "template": digest(PROMPTS[kind]),
        "endpoint": redact_url(cfg.endpoint) if cfg.endpoint else None, "limits": asdict(cfg.limits),
        "generator_key": finetune_info["key"] if finetune_info else None,
    }
    rows, totals = run_generation(source, passages, out, generator, kind, cfg,
                                  {"fingerprint": digest(settings), "settings": settings})
    if totals["queries_kept"] == 0:
        raise DrscalingError(
            f"no usable query for any of {totals['passages']} passage(s) after {cfg.max_retries} retries "
            f"(model {generator.name!r}, prompt {kind!r}); see 'last_output' in {partial_path(out)}. Running "
            "again retries these passages; --restart (restart=True) starts over")
    fixed_usd = float(finetune_info["usd"]) if finetune_info else 0.0
    cost = _cost(source, model, generator, kind, cfg, totals, fixed_usd, finetune_info)
    if track:
        cost["mlflow_run_id"] = _log_mlflow(source, cost, PROMPTS[kind], settings | {"limit": cfg.limit, "batch_size": cfg.batch_size},
                                            finetune_info["losses"] if finetune_info else ())
    final = [{"qid": r["qid"], "pid": r["pid"], "query": r["query"]} for r in rows if not r.get("failed")]
    return Annotations(final, cost, finish=lambda: remove_partial(out))


def _supervised_generator(source: str, prepared, out: Path, cfg: GenerationConfig, finetune: FinetuneConfig | None,
                          generator_dir, targets: Sequence[str]) -> tuple[GenerationConfig, str, dict | None]:
    """(config, model spec, fine-tuning info): for `supervised`, the generator fine-tuned here
    when one is to be trained; otherwise config.model unchanged."""
    if source != "supervised":
        return cfg, cfg.model, None
    if cfg.endpoint:
        raise DrscalingError("the supervised source runs a local generator; endpoint is for source='llm'")
    if cfg.model != DEFAULT_MODEL and finetune is None:  # config.model is an already trained generator
        return cfg, cfg.model, None
    ft = finetune or FinetuneConfig(device=cfg.device, usd_per_device_hour=cfg.usd_per_device_hour)
    exclude = list(targets) if ft.holdout_targets else []
    gdir = Path(generator_dir) if generator_dir else companion(out, "-generator")
    info = finetune_generator(prepared, gdir, ft, exclude, cfg.cache_dir)
    # prompt the generator with passages cut exactly as in fine-tuning
    return dataclasses.replace(cfg, max_passage_tokens=ft.max_passage_tokens), str(gdir), info


def _generator(source: str, model: str, cfg: GenerationConfig, generator: Generator | None) -> tuple[Generator, str]:
    """The generator to run and its prompt kind."""
    if generator is not None:
        kind = getattr(generator, "prompt_kind", None) or resolve_prompt(cfg.prompt, source, False, local=not cfg.endpoint)
        return generator, kind
    if cfg.endpoint:
        kind = resolve_prompt(cfg.prompt, source, seq2seq=False, local=False)
        return EndpointGenerator(cfg.endpoint, model, cfg.resolved_api_key(), kind,
                                 cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind], cfg.temperature,
                                 cfg.top_p, cfg.request_timeout_s, cfg.batch_size, cfg.request_attempts), kind
    local = LocalGenerator.load(model, source, cfg)
    return local, local.prompt_kind


def _cost(source: str, model: str, generator: Generator, kind: str, cfg: GenerationConfig, totals: dict,
          fixed_usd: float, finetune_info: dict | None) -> dict:
    cost = {
        "source": source, "pairs": totals["queries_kept"], "model": generator.name, "model_spec": model,
        "device": generator.device,
        "prompt_kind": kind, "prompt_template": PROMPTS[kind], "seed": cfg.seed, "limit": cfg.limit,
        "batch_size": cfg.batch_size, "max_new_tokens": getattr(generator, "max_new_tokens", cfg.max_new_tokens),
        "pick": cfg.pick, **totals, **price(totals, cfg, fixed_usd),
    }
    if finetune_info:
        cost["finetune"] = {k: v for k, v in finetune_info.items() if k != "losses"} | {
            "final_loss": finetune_info["losses"][-1] if finetune_info["losses"] else None}
    return finite_or_null(cost)  # strict JSON (a diverged fine-tuning loss as null)


def _log_mlflow(source: str, cost: dict, prompt_text: str, extra_params: dict,
                finetune_losses: Sequence[float] = ()) -> str | None:
    """Log to the active run, or to a new run in experiment "annotate". Returns the run id."""
    from drscaling import tracking

    tracking.configure()
    import mlflow

    own = mlflow.active_run() is None
    if own:
        tracking.use_experiment(os.environ.get("DRSCALING_ANNOTATE_EXPERIMENT") or tracking.experiment("annotate"))
        mlflow.start_run(run_name=f"generate-{source}")
    try:
        run_id = mlflow.active_run().info.run_id
        # Prefixed by source: one parent run may hold both generated sources without key clashes.
        params = {f"generate.{source}.{k}": v for k, v in extra_params.items() if v is not None}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {f"generate.{source}.{k}": float(cost[k]) for k in (
            "passages", "queries_kept", "passages_failed", "passages_resumed", "attempts", "tokens_in",
            "tokens_out", "generation_seconds", "session_wall_seconds", "usd_per_1k_pairs", "usd_per_pair",
            "usd_total", "usd_fixed", "queries_per_second") if isinstance(cost.get(k), int | float)}
        mlflow.log_metrics(metrics)
        for step, loss in enumerate(finetune_losses, start=1):
            mlflow.log_metric(f"generate.{source}.finetune_loss", loss, step=step)
        mlflow.set_tags({"drscaling.stage": "annotate", "source": source,
                         f"generate.{source}.prompt_kind": cost["prompt_kind"],
                         f"generate.{source}.model": cost["model"]})
        mlflow.log_text(prompt_text, f"generate/{source}_prompt.txt")
        mlflow.log_text(to_json(cost), f"generate/{source}.cost.json")
    except BaseException as exc:  # SIGTERM while logging: the run ends KILLED with its cause, not FINISHED
        if own:
            tracking.end_run_with_cause(mlflow, exc)
        raise
    if own:
        mlflow.end_run()
    return run_id


def use_pregenerated(
    source: str, pregenerated_path: str | Path, prepared: str | Path, out: str | Path,
    report: str | Path | None = None,
) -> dict:
    """pregenerated_annotations, published at `out` once they pass the GX checks."""
    ann = pregenerated_annotations(source, pregenerated_path, prepared)
    publish(out, ann, prepared, report or companion(out, ".validation.json"))
    return ann.cost


def pregenerated_annotations(source: str, pregenerated_path: str | Path, prepared: str | Path) -> Annotations:
    """Take a shipped pre-generated file (e.g. data/generated/<source>.jsonl and its .cost.json)
    instead of generating: rows whose pid is not a passage of the current train corpus are
    dropped (the dataset may have been re-prepared since), the cost JSON is carried over."""
    _check_source(source)
    src = Path(pregenerated_path)
    if not src.exists():
        raise DrscalingError(
            f"pre-generated annotations not found: {src} (generate them with `drscaling annotate "
            f"--source {source} --regenerate`, or restore the shipped data/generated/ files)")
    src_cost = cost_path(src)
    if not src_cost.exists():
        raise DrscalingError(f"{src} has no cost file {src_cost.name} beside it; the budget model needs it")
    rows = read_jsonl(src, ("qid", "pid", "query"))
    train_pids = set(load_split(prepared, "train").corpus["pid"])
    kept, seen = [], set()
    for r in rows:
        if r["pid"] in train_pids and r["qid"] not in seen:
            seen.add(r["qid"])
            kept.append({"qid": str(r["qid"]), "pid": str(r["pid"]), "query": str(r["query"])})
    if not kept:
        raise DrscalingError(f"none of the {len(rows)} rows of {src} points at a passage of {prepared}'s train split")
    cost = carried_over(read_json(src_cost, "cost file"), len(kept), len(rows), str(src))
    return Annotations(kept, cost)
