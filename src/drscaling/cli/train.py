"""Training commands: train, sweep, study, distill, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

from drscaling import params
from drscaling.cli.common import A, Register, current_params, params_flag, prepared, prepared_flag
from drscaling.errors import DrscalingError

def _train_paths(args, out: str | Path):
    from drscaling.train.config import Paths

    return Paths(
        prepared=Path(prepared(args)),
        annotations=Path(args.annotations or f"{A}/annotations"),
        tokenizer=Path(args.tokenizer or f"{A}/tokenizer"),
        out=Path(out),
    )


def cmd_train(args) -> None:
    from drscaling.checkpoints import init_for
    from drscaling.train.config import TrainConfig
    from drscaling.train.run import train

    base = params.section("train")
    if args.section:  # e.g. towers_teacher: overrides of the train section, eval merged key by key
        extra = params.section(args.section)
        if not extra:
            raise DrscalingError(f"params.yaml has no section '{args.section}'")
        base = base | extra | {"eval": dict(base.get("eval") or {}) | dict(extra.get("eval") or {})}
    cfg = params.from_args(TrainConfig, args, base)
    cfg.init = init_for(cfg.init, cfg.shape)  # params.yaml may map shape families to templates
    out = args.out or f"{A}/runs/{cfg.shape}-D{cfg.train_pairs or 'all'}-{cfg.annotation_source}-{cfg.key()}"
    m = train(cfg, _train_paths(args, out), discard_checkpoint=args.discard_checkpoint)
    if m.get("cached"):
        print(f"already trained with these parameters and data: {out}/metrics.json")
    shown = {k: v for k, v in m.items() if k not in ("history", "data_key")}
    print(json.dumps(shown, indent=2))


def cmd_distill(args) -> None:
    from drscaling.distill import DistillConfig, distill, format_comparison

    cfg = params.from_args(DistillConfig, args, params.section("distill"))
    out = args.out or f"{A}/towers/distilled"
    result = distill(cfg, args.teacher, _train_paths(args, out), baseline=args.baseline)
    print(format_comparison(result))
    print(f"distilled model (query: {cfg.student_shape}, passage: the teacher's): {out}/model; metrics: {out}/metrics.json")


def cmd_evaluate(args) -> None:
    from drscaling.evaluate import EvalConfig, evaluate_model, log_evaluation
    from drscaling.files import write_json

    cfg = params.from_args(EvalConfig, args, params.section("train").get("eval", {}))
    data = prepared(args)
    result = evaluate_model(args.model, data, args.split, cfg)
    if args.out:
        write_json(args.out, result)
    if not args.no_mlflow:
        log_evaluation(result, args.model, data, args.split, cfg)
    print(json.dumps(result, indent=2))


def cmd_sweep(args) -> None:
    from drscaling.executors import RayConfig
    from drscaling.sweep import format_results, load_preset, run_sweep

    sweep = params.section("sweep")
    preset = load_preset(args.preset or sweep.get("preset", "quick"))
    out = Path(args.out or f"{A}/sweeps/{preset.name}")
    ray = params.build(RayConfig, dict(sweep.get("ray") or {}))
    if args.ray_address:
        ray.address = args.ray_address
    results = run_sweep(preset, _train_paths(args, out), params.section("train"), out, args.only,
                        overrides=sweep.get("train") or {}, executor=args.executor or sweep.get("executor", "local"),
                        ray=ray)
    print(format_results(results))


def cmd_study(args) -> None:
    """Thin: parse, hand off to drscaling.study."""
    from drscaling.cli import run_in_process
    from drscaling.study import StudyConfig, run_study

    run_study(StudyConfig(data=args.data, format=args.format, preset=args.preset, out=args.out, name=args.name,
                          sources=tuple(args.sources), dvc=args.dvc, new_data_version=args.new_data_version,
                          n_bootstrap=args.n_bootstrap, costs_path=args.costs_path), run_stage=run_in_process)


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------


def _train_sweep_parsers(cmd: Register) -> None:
    from drscaling.executors import EXECUTORS
    from drscaling.sweep import SWEEPS
    from drscaling.train.config import TrainConfig

    for name, func, help in (("train", cmd_train, "train one encoder (one MLflow run)"),
                             ("sweep", cmd_sweep, "run a preset's model/data/source/joint sweeps")):
        p = cmd(name, func, help)
        _data_flags(p)
        p.add_argument("--out", help=f"output folder (default: {A}/runs/<shape>-D<pairs>-<source>-<config key>)"
                       if name == "train" else f"sweep folder (default: {A}/sweeps/<preset>)")
        if name == "train":
            p.add_argument("--section", help="params.yaml section whose values override the train section's")
            p.add_argument("--discard-checkpoint", action="store_true",
                           help="start afresh when --out holds an unusable checkpoint (corrupt, or made on other data)")
            params.add_flags(p, TrainConfig, current_params().get("train") or {}, "train")
        else:
            params_flag(p, "--preset", "sweep.preset", "preset name in pipelines/ or a YAML path", "quick")
            p.add_argument("--only", choices=SWEEPS, help="run one sweep of the preset (default: all of them)")
            params_flag(p, "--executor", "sweep.executor", "local: points one after another here; ray: each point a "
                        "task on a Ray cluster", "local", choices=EXECUTORS)
            params_flag(p, "--ray-address", "sweep.ray.address", "the cluster's head, host:6379",
                        note="empty: RAY_ADDRESS, else a local cluster")


def _data_flags(p) -> None:
    """Where training reads its data: the dataset, the annotation files, the shared tokenizer."""
    prepared_flag(p)
    p.add_argument("--annotations", help=f"folder of <source>.jsonl (default {A}/annotations)")
    p.add_argument("--tokenizer", help=f"shared tokenizer folder (default {A}/tokenizer)")


def _study_parser(cmd: Register) -> None:
    from drscaling.annotation import sources

    p = cmd("study", cmd_study, "scaling laws for your own data: import, annotate, sweeps sized to the data, fit, "
            "budget and report in one command (one MLflow experiment; --dvc: a DVC pipeline in the study folder)")
    p.add_argument("data", help="pairs: a JSONL file of {query, passage}; msmarco/beir: a folder; ir_datasets: an id")
    p.add_argument("--format", choices=["pairs", "msmarco", "beir", "ir_datasets"], default="pairs",
                   help="the layout of DATA (default: %(default)s)")
    p.add_argument("--preset", default="quick", help="sweep preset to size to the data (name in pipelines/ or a YAML "
                                                     "path; default quick, the CPU preset)")
    p.add_argument("--out", type=Path, help="study folder (default studies/<name>); reruns resume there")
    p.add_argument("--name", help="study name (default: from DATA's file name); the MLflow experiment is study-<name>")
    p.add_argument("--sources", nargs="+", default=["human"], choices=sources.names(),
                   help="annotation sources to annotate and sweep (default human; ict is free; supervised and llm "
                        "generate queries for this data, slowly on a CPU, and are priced by what they cost)")
    p.add_argument("--dvc", action="store_true", help="make the study folder a DVC project (the data `dvc add`ed, "
                   "the stages in its dvc.yaml) and run the sweeps onwards with `dvc repro`")
    p.add_argument("--new-data-version", action="store_true",
                   help="accept DATA for a study folder made from other data (its next data version)")
    # the study folder has its own params.yaml: the project's fit section does not reach it
    p.add_argument("--n-bootstrap", type=int, help="bootstrap refits per law (default: 1000, the fit stage's own)")
    p.add_argument("--costs-path", help="measured costs JSON (default costs/costs.json in the project; the paper's "
                                        "cost model when absent)")


def _distill_evaluate_parsers(cmd: Register) -> None:
    from drscaling.distill import DistillConfig
    from drscaling.evaluate import EvalConfig

    p = cmd("distill", cmd_distill, "distil a trained large query tower into a small one (ScalingNote stage 2)")
    p.add_argument("--teacher", required=True, help="trained model or run folder (e.g. dual smollm2-135m towers)")
    p.add_argument("--baseline", help="a small model trained end to end on the same data and steps, to compare with")
    _data_flags(p)
    p.add_argument("--out", help=f"output folder: model/ and metrics.json (default {A}/towers/distilled)")
    params.add_flags(p, DistillConfig, current_params().get("distill") or {}, "distill")

    p = cmd("evaluate", cmd_evaluate, "contrastive entropy and ranking metrics of any saved model")
    p.add_argument("--model", required=True, help="drscaling model folder, any HF encoder folder, an MLflow run "
                   "(runs:/<id>/model or its id) or a registered model (models:/drscaling-<shape>@recommended)")
    prepared_flag(p)
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to score (default: %(default)s)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the evaluation to MLflow")
    params.add_flags(p, EvalConfig, (current_params().get("train") or {}).get("eval") or {}, "train.eval")


def register(cmd: Register) -> None:
    _train_sweep_parsers(cmd)
    _study_parser(cmd)
    _distill_evaluate_parsers(cmd)
