"""drscaling command line: one sub-command per pipeline stage.

dvc.yaml stages and MLproject entry points call these commands, so every way of running a stage goes
through the same function. Defaults come from params.yaml; flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from drscaling import params
from drscaling.errors import DrscalingError

A = "artifacts"
# Measured costs are versioned data in git (timings are not reproducible, so not a DVC stage output):
# `make measure` re-measures them, the budget reads them (params.yaml budget.costs_path).
COSTS = "costs/costs.json"


def _p(args: argparse.Namespace, name: str, section: str, default):
    """A path or value: the flag if given, else params.yaml[section][name], else the default."""
    value = getattr(args, name, None)
    return value if value is not None else params.section(section).get(name, default)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def cmd_extract_debian(args) -> None:
    from drscaling.debian import extract

    n = extract(args.dest, args.lists_dir, fetch=not args.no_fetch)
    print(f"wrote {n} pairs to {args.dest}")


def cmd_import(args) -> None:
    from drscaling import data
    from drscaling.dataset.build import parse_mapping

    d = params.section("data")
    sizes = {"dev_size": args.dev_size, "test_size": args.test_size,
             "seed": args.seed if args.seed is not None else d.get("seed", 13),
             "defaults": {"dev": d.get("dev_size", 1000), "test": d.get("test_size", 1000)}}
    mapping = parse_mapping(args.split)
    if mapping and args.format not in ("beir", "ir_datasets"):
        raise DrscalingError(f"--split applies to --format beir and ir_datasets, not {args.format}")
    if args.format == "msmarco" and (args.dev_size or args.test_size):
        raise DrscalingError("--dev-size/--test-size do not apply to --format msmarco: its files name the splits")
    if args.format == "msmarco":
        report = data.import_msmarco(args.src, args.dest)
    elif args.format == "pairs":
        report = data.import_pairs(args.src, args.dest, sizes["dev_size"], sizes["test_size"], sizes["seed"],
                                   sizes["defaults"])
    elif args.format == "beir":
        from drscaling.dataset.beir import import_beir

        report = import_beir(args.src, args.dest, mapping=mapping, **sizes)
    else:
        from drscaling.dataset.irds import import_ir_datasets

        report = import_ir_datasets(args.src, args.dest, mapping=mapping, **sizes)
    print(report.message())


def cmd_prepare(args) -> None:
    from drscaling.data import prepare_debian

    d = params.section("data")
    counts = prepare_debian(_p(args, "raw", "data", "data/debian/pairs.jsonl"), _p(args, "prepared", "data", f"{A}/prepared"),
                            d.get("dev_size", 1000), d.get("test_size", 1000), d.get("seed", 13))
    print("prepared: " + ", ".join(f"{k}={v} pairs" for k, v in counts.items()))


def cmd_validate(args) -> None:
    from drscaling.validate import Bounds, validate_dataset

    bounds = params.build(Bounds, params.section("validate"))
    prepared = _p(args, "prepared", "data", f"{A}/prepared")
    summary = validate_dataset(prepared, args.report, bounds)
    print(f"validation passed: {sum(summary['rows'].values())} rows in {len(summary['rows'])} files; report {args.report}")


def cmd_tokenizer(args) -> None:
    from drscaling.data import load_split
    from drscaling.model import train_tokenizer

    prepared = _p(args, "prepared", "data", f"{A}/prepared")
    train = load_split(prepared, "train")
    vocab = args.vocab_size or params.section("tokenizer").get("vocab_size", 16384)
    tok = train_tokenizer(list(train.corpus["text"]) + list(train.queries["text"]), vocab, args.out)
    print(f"WordPiece vocabulary of {len(tok)} tokens in {args.out}")


# ---------------------------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------------------------


def cmd_annotate(args) -> None:
    from drscaling.annotate import companion
    from drscaling.annotation import sources

    source = sources.get(args.source)
    out = Path(args.out or f"{A}/annotations/{args.source}.jsonl")
    # an --out elsewhere keeps its GX report beside it: the pipeline's own report is a DVC output
    report = (Path(f"{A}/validation/annotations-{args.source}.json") if args.out is None
              else companion(out, ".validation.json"))
    generation = {"limit": args.limit, "endpoint": args.endpoint, "model": args.model,
                  "request_timeout_s": args.timeout, "request_attempts": args.attempts,
                  "restart": True if args.restart else None}
    request = sources.Request(prepared=Path(_p(args, "prepared", "data", f"{A}/prepared")), out=out, report=report,
                              settings=params.section("annotate"), regenerate=args.regenerate, generation=generation)
    cost = source.run(request)
    print(f"{args.source}: {cost['pairs']} pairs in {out} (validated; ${cost['usd_per_pair']:.3g}/pair)")


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------


def _train_paths(args, out: str | Path):
    from drscaling.train import Paths

    return Paths(
        prepared=Path(_p(args, "prepared", "data", f"{A}/prepared")),
        annotations=Path(args.annotations or f"{A}/annotations"),
        tokenizer=Path(args.tokenizer or f"{A}/tokenizer"),
        out=Path(out),
    )


def cmd_train(args) -> None:
    from drscaling.checkpoints import init_for
    from drscaling.train import TrainConfig, train

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
    from drscaling import registry, tracking
    from drscaling.evaluate import EvalConfig, evaluate_model
    from drscaling.files import write_json

    cfg = params.from_args(EvalConfig, args, params.section("train").get("eval", {}))
    prepared = _p(args, "prepared", "data", f"{A}/prepared")
    result = evaluate_model(args.model, prepared, args.split, cfg)
    if args.out:
        write_json(args.out, result)
    if not args.no_mlflow:
        import mlflow

        with tracking.stage_run("evaluate", f"eval-{result['shape']}-{args.split}",
                                {"drscaling.stage": "evaluate", "shape": result["shape"]}):
            mlflow.log_params({"model": args.model, "data": prepared, "split": args.split,
                               "n_non_embedding": result["n_non_embedding"]} | {f"eval_{k}": v for k, v in vars(cfg).items()})
            mlflow.log_metrics(tracking.metric_names({k: v for k, v in result.items() if isinstance(v, float)}))
            registry.log_dataset(prepared, tracking.file_version(prepared), "evaluation", name=f"prepared/{args.split}")
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
    from drscaling.study import StudyConfig, run_study

    run_study(StudyConfig(data=args.data, format=args.format, preset=args.preset, out=args.out, name=args.name,
                          sources=tuple(args.sources), dvc=args.dvc, new_data_version=args.new_data_version,
                          n_bootstrap=args.n_bootstrap, costs_path=args.costs_path))


# ---------------------------------------------------------------------------------------------
# laws, report, budget
# ---------------------------------------------------------------------------------------------


def cmd_fit(args) -> None:
    """Fit every registered law form to the preset's sweep results; print each law with its points,
    dof, intervals, held-out errors and flags. params.yaml `fit:` may set n_bootstrap, seed,
    holdout_largest, sources (the annotation sources to fit: each must have points), workers and
    bootstrap_method; flags override them."""
    from drscaling import laws, tracking
    from drscaling.files import write_jsonl
    from drscaling.sweep import merge_results

    preset = args.preset or params.section("sweep").get("preset", "quick")
    fit = params.section("fit")
    pick = lambda name, default=None: v if (v := getattr(args, name, None)) is not None else fit.get(name, default)  # noqa: E731
    out = Path(args.out or f"{A}/laws")
    points = out / "points.jsonl"
    sweeps = Path(args.sweeps or f"{A}/sweeps") / preset
    write_jsonl(points, merge_results(sweeps))
    summary = laws.fit_sweep(points, out, n_bootstrap=int(pick("n_bootstrap", 1000)), seed=int(fit.get("seed", 0)),
                             holdout_largest=int(fit.get("holdout_largest", 1)), sources=pick("sources"),
                             workers=pick("workers"), bootstrap_method=pick("bootstrap_method", "parametric"))
    with tracking.stage_run("laws", f"fit-{preset}", {"drscaling.stage": "fit", "preset": preset}):
        laws.log_to_mlflow(summary)
    _figures_to_sweep_parents(sweeps, summary.get("figures") or {})
    print(laws.format_fits(laws.load_laws(summary["laws_path"]), summary.get("skipped")))


FIGURE_OF_SWEEP = {"model": ("fig3", "fig2"), "data": ("fig4",), "source": ("fig5",), "joint": ("fig6",)}


def _figures_to_sweep_parents(sweeps: Path, figures) -> None:
    """Each sweep's parent run also gets the figure of its law, so the UI shows it where the points are."""
    import mlflow

    paths = list(figures.values()) if isinstance(figures, dict) else list(figures)
    client = mlflow.MlflowClient()
    for sweep, prefixes in FIGURE_OF_SWEEP.items():
        state = sweeps / f"parent-{sweeps.name}-{sweep}.json"
        if not state.exists():
            continue
        run_id = json.loads(state.read_text())["run_id"]
        for fig in paths:
            if Path(fig).name.startswith(prefixes):
                client.log_artifact(run_id, str(fig), artifact_path="figures")


def cmd_report(args) -> None:
    from drscaling import report, tracking
    from drscaling.study.folder import data_lines

    laws_path = Path(args.laws or f"{A}/laws/laws.json")
    budget = Path(args.budget_json or f"{A}/budget/budget.json")
    out = report.write_report(laws_path, args.out, budget if budget.exists() else None,
                              header=data_lines(params.section("study")))
    with tracking.stage_run("laws", "report", {"drscaling.stage": "report"}):
        report.log_report(out, laws_path, budget if budget.exists() else None)
    print(f"report written to {out}")


def _opt_float(text: str) -> float | None:
    """A float flag where "" (an MLproject parameter left empty) means not given."""
    return None if text == "" else float(text)


def _opt_str(text: str) -> str | None:
    return text or None


def _costs_mode(text: str) -> str | None:
    if text == "":
        return None
    if text not in ("paper", "measured"):
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from 'paper', 'measured')")
    return text


def cmd_budget(args) -> None:
    from drscaling import budget as B
    from drscaling import registry, tracking

    cfg = params.section("budget")
    pick = lambda name, default=None: v if (v := getattr(args, name, None)) is not None else cfg.get(name, default)  # noqa: E731
    if args.towers:
        return cmd_budget_towers(args, pick)
    laws = args.laws or f"{A}/laws/laws.json"
    published = laws in B.LAW_SETS
    # A published law set reproduces the paper: its costs unless --costs says otherwise, no artifacts read,
    # and a result folder that is not the pipeline's DVC output.
    mode = args.costs or ("paper" if published else cfg.get("costs", "paper"))
    out = Path(args.out or (f"{A}/budget-paper" if published else f"{A}/budget"))
    source = pick("source", "human")
    scale = cfg.get("measured") or {}
    ann_cost = Path(f"{A}/annotations/{source}.cost.json")
    shapes = runs = None
    points = Path(laws).with_name("points.jsonl")  # written beside laws.json by `drscaling fit`
    if not published and points.exists():
        rows = [json.loads(line) for line in points.read_text().splitlines() if line.strip()]
        shapes = {r["shape"]: r["n"] for r in rows if r.get("shape")}
        runs = [{"shape": r.get("shape"), "n": r.get("n"), "d": r.get("d"), "loss": r.get("ce_test_min"),
                 "source": r.get("source"), "config_key": r.get("config_key")} for r in rows]
    eval_negatives = (params.section("train").get("eval") or {}).get("negatives")
    result = B.run_budget(
        laws, float(pick("budget", 20000)), bool(pick("include_inference", False)),
        mode, pick("costs_path", COSTS) if mode == "measured" else None, out,
        annotation_cost_path=ann_cost if mode == "measured" and ann_cost.exists() and not published else None,
        source_cost_paths=[] if published else sorted(Path(f"{A}/annotations").glob("*.cost.json")),
        # paper mode keeps the paper's own corpus and steps unless given on the command line
        steps=args.steps if mode == "paper" else args.steps or scale.get("steps"),
        corpus_pages=args.corpus_pages if mode == "paper" else args.corpus_pages or scale.get("corpus_pages"),
        tokens_per_page=args.tokens_per_page if mode == "paper" else args.tokens_per_page or scale.get("tokens_per_page"),
        shapes=shapes, measured_runs=runs,
        extrapolation_factor=float(pick("extrapolation_factor", B.EXTRAPOLATION_FACTOR)),
        negatives=args.negatives, default_negatives=int(eval_negatives) if eval_negatives else None,
        law=args.law or "ND",
    )
    if not args.no_mlflow:
        import mlflow

        name = f"budget-{mode}-{result['budget']:g}" + (f"-{result['law_set']}" if published else "")
        tags = {"drscaling.stage": "budget", "costs": mode, "laws": str(result["laws"])}
        with tracking.stage_run("budget", name, tags):
            mlflow.log_artifacts(str(out), artifact_path="budget")
            metrics, flag_tags = B.mlflow_fields(result)
            mlflow.log_metrics(metrics)
            mlflow.set_tags(flag_tags)
            picked = None if published else registry.recommend(result)  # @recommended on the picked version
            if picked:
                mlflow.set_tag("budget.recommended_model", f"{picked['name']}/{picked['version']}")
    if args.show_derivation or mode == "paper":
        print("\n".join(B.paper_derivation()))
    print(B.format_recommendation(result))
    if not args.no_mlflow and not published:
        print(f"MLflow registry: {picked['uri']} = version {picked['version']} ({picked['why']})" if picked else
              "MLflow registry: no registered version of the picked run (trained before models were registered,"
              " or in another tracking store); @recommended not set")
    print(f"written to {out / 'budget.json'}")


def cmd_budget_towers(args, pick) -> None:
    """Which dual-tower deployment for the budget: large / large passage + distilled query / small."""
    import dataclasses

    import mlflow

    from drscaling import budget as B
    from drscaling import tracking

    # Each workload number: the flag, else params budget.towers, else budget.measured (the corpus), else the default.
    layers = (vars(args), params.section("budget").get("towers") or {}, params.section("budget").get("measured") or {})

    def value(name: str, default: float) -> float:
        return float(next((d[name] for d in layers if d.get(name) is not None), default))

    workload = B.TowerWorkload(**{f.name: value(f.name, f.default) for f in dataclasses.fields(B.TowerWorkload)})
    mode = pick("costs", "measured")
    out = Path(args.out or f"{A}/budget-towers")
    costs_path = pick("costs_path", COSTS) if mode == "measured" else None
    result = B.run_tower_budget(args.towers, float(pick("budget", 20000)), mode, costs_path, out, workload)
    with tracking.stage_run("budget", f"budget-towers-{mode}-{result['budget']:g}",
                            {"drscaling.stage": "budget", "costs": mode, "drscaling.towers": "true"}):
        mlflow.log_params({"budget": result["budget"], "costs": mode, "towers": args.towers}
                          | {f"workload_{k}": v for k, v in result["workload"].items()})
        for r in result["deployments"]:
            if "cost" in r:
                mlflow.log_metrics({f"{r['name']}_{k}_usd": v for k, v in r["cost"].items()
                                    if isinstance(v, float)} | {f"{r['name']}_ce": r["ce"],
                                                                f"{r['name']}_fits": float(r["fits"])})
        mlflow.set_tag("best_deployment", result["best"] or "none")
        mlflow.log_artifact(str(out / "towers.json"), artifact_path="budget")
    print(B.format_tower_comparison(result))
    print(f"written to {out / 'towers.json'}")


def cmd_summary(args) -> None:
    """What the default pipeline produced, from its files (also when `dvc repro` had nothing to do)."""
    from drscaling.budget import format_recommendation
    from drscaling.files import read_json

    laws_path = Path(f"{A}/laws/laws.json")
    if not laws_path.exists():
        raise DrscalingError(f"{laws_path} not found: run `dvc repro` (or `drscaling fit`) first")
    from drscaling.laws import load_laws
    from drscaling.laws.text import format_fits

    print(format_fits(load_laws(laws_path)))  # each law with its points, dof, intervals, held-out errors, flags
    budget = Path(f"{A}/budget/budget.json")
    if budget.exists():
        print(format_recommendation(read_json(budget)))
    towers = Path(f"{A}/towers/budget/towers.json")  # the ScalingNote pipeline, when it has run
    if towers.exists():
        from drscaling.budget import format_tower_comparison
        from drscaling.distill import format_comparison

        print(format_comparison(read_json(Path(f"{A}/towers/distilled/metrics.json"))))
        print(format_tower_comparison(read_json(towers)))
    print("MLflow UI: mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)")


# ---------------------------------------------------------------------------------------------
# export, serving, measured cost
# ---------------------------------------------------------------------------------------------


def _ce_metric(prepared: str | Path, cfg):
    """Contrastive entropy on the test split for any encode(texts, max_len) function (export variants),
    or for a query and a passage encode function (dual towers)."""
    from drscaling.evaluate import cached_evalset, embed_evalset

    es = cached_evalset(prepared, "test", cfg)
    return lambda query_fn, passage_fn=None: embed_evalset(query_fn, passage_fn or query_fn, es, cfg).ce()


def export_one(model: str | Path, out: Path, variants: list[str], prepared, eval_cfg, repo: Path | None, name: str,
               serve_cfg: dict, quality: bool = True) -> dict:
    from drscaling import export, serving, tracking

    with tracking.stage_run("export", f"export-{name}", {"drscaling.stage": "export", "model": name}):
        record = export.export_onnx(model, out, variants=tuple(variants))
        scored = export.quality_delta(out, _ce_metric(prepared, eval_cfg), model_dir=model) if quality else None
    if repo is not None:
        from drscaling.model import is_dual

        # Dual towers become two models, <name>-query and <name>-passage.
        build = serving.build_tower_repository if is_dual(out) else serving.build_model_repository
        # params.yaml `serving` keys that are repository settings; the rest keep RepositoryConfig's defaults
        options = {f.name: serve_cfg[f.name] for f in dataclasses.fields(serving.RepositoryConfig) if f.name in serve_cfg}
        build(out, repo, name, **options)
    return {"record": record, "quality": scored}


def cmd_export(args) -> None:
    from drscaling.evaluate import EvalConfig
    from drscaling.sweep import merge_results

    eval_cfg = params.build(EvalConfig, params.section("train").get("eval", {}))
    serve_cfg = params.section("serving")
    variants = args.variants or serve_cfg.get("variants", ["fp32", "int8"])
    prepared = _p(args, "prepared", "data", f"{A}/prepared")
    repo = Path(args.repo) if args.repo else None
    if args.from_sweep:
        rows = [r for r in merge_results(Path(args.sweeps or f"{A}/sweeps") / args.from_sweep) if r["sweep"] == "model"]
        if not rows:
            raise DrscalingError(f"the {args.from_sweep} preset has no model sweep results to export")
        targets = {r["shape"]: r["model_dir"] for r in rows}
    elif args.model:
        from drscaling.registry import model_name

        targets = {args.name or model_name(str(args.model)): args.model}
    else:
        raise DrscalingError("give --model (a model folder, runs:/<id>/model or models:/<name>@<alias>) or --from-sweep PRESET")
    out_root = Path(args.out or f"{A}/export")
    for name, model in targets.items():
        result = export_one(model, out_root / name if len(targets) > 1 or args.from_sweep else out_root, variants,
                            prepared, eval_cfg, repo, name, serve_cfg, quality=not args.no_quality)
        q = result["quality"]
        if q is None:
            print(f"{name}: exported {', '.join(variants)} (parity checked; CE not scored: --no-quality)")
        else:
            deltas = ", ".join(f"{v}: CE {d['value']:.4f} ({d['delta']:+.4f})" for v, d in q["variants"].items()
                               if d.get("value") is not None)
            print(f"{name}: exported {', '.join(variants)}; torch CE {q['torch']:.4f}; {deltas}")
        for side, rec in (result["record"].get("towers") or {}).items():
            fp32 = rec["variants"]["fp32"]
            print(f"  {side} tower {rec['shape']} (N={rec['n_non_embedding']:,}): fp32 max |diff| "
                  f"{fp32['parity']['max_abs_diff']:.2g}, {fp32['size_bytes'] / 2**20:.0f} MiB"
                  + (f"; served as {name}-{side}" if repo is not None else ""))
    if repo is not None:
        print(f"Triton model repository: {repo}  (start it with `drscaling serve --repo {repo}`)")


def cmd_serve(args) -> None:
    from drscaling.serving import serve

    raise SystemExit(serve(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, log_path=args.log))


def _read_texts(args) -> list[str]:
    texts = list(args.texts or [])
    if args.file:
        texts += [line.rstrip("\n") for line in open(args.file, encoding="utf-8") if line.strip()]
    if not texts:
        raise DrscalingError("no texts given (pass them as arguments or with --file)")
    return texts


def cmd_encode(args) -> None:
    import numpy as np

    from drscaling.serving import encode_texts

    emb = encode_texts(args.url, args.model, _read_texts(args), protocol=args.protocol, tokenizer=args.tokenizer,
                       role=args.role, repo=args.repo, server_tokenize=args.server_tokenize)
    if args.out:
        from drscaling.files import atomic_open

        with atomic_open(args.out, "wb") as fh:
            np.save(fh, emb)
        print(f"{emb.shape[0]} embeddings of dimension {emb.shape[1]} written to {args.out}")
    else:
        for row in emb:
            print(json.dumps([round(float(x), 6) for x in row]))


def cmd_index(args) -> None:
    from drscaling.serving import build_index

    from drscaling.vector_index import config_from

    index = config_from(index_type=args.index_type, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_construction=args.ef_construction, ef_search=args.ef_search)
    info = build_index(args.url, args.model, args.corpus, args.out, protocol=args.protocol, tokenizer=args.tokenizer,
                       repo=args.repo, index=index, server_tokenize=args.server_tokenize)
    settings = ", ".join(f"{k} {v}" for k, v in info["index"].items() if k != "type")
    print(f"indexed {info['n']} passages with {info['model']} into {args.out} ({info['index']['type']} FAISS index"
          f"{': ' + settings if settings else ''}; query it with --model {info['query_model']})")


def cmd_search(args) -> None:
    from drscaling.serving import search

    for rank, (pid, score, text) in enumerate(
        search(args.url, args.model, args.index, args.query, k=args.k, protocol=args.protocol, tokenizer=args.tokenizer,
               repo=args.repo, nprobe=args.nprobe, ef_search=args.ef_search,
               server_tokenize=args.server_tokenize), 1
    ):
        print(f"{rank:>3}. {score:8.3f}  {pid}  {text[:100].replace(chr(10), ' ')}")


def _cost_figure(costs: dict, path: Path) -> None:
    """$ per million tokens (inference) and $ per step (training) against N: points with the range of
    their repeats, fitted curves with the fit's interval of b in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    parts = [("inference", "usd_per_million_tokens", 1e6, "$ per 1M tokens (served)"),
             ("training", "usd_per_step", 1.0, "$ per training step")]
    parts = [p for p in parts if p[0] in costs]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False)
    for ax, (key, field, scale, label) in zip(axes[0], parts, strict=True):
        pts = costs[key]["points"]
        n = np.array([p["n"] for p in pts], dtype=float)
        y = np.array([p[field] for p in pts])
        if key == "inference" and all("tokens_per_s_repeats" in p for p in pts):
            # $ is inverse to tokens/s: the slowest repeat is the highest cost.
            lo = np.array([p["tokens_per_s"] / max(p["tokens_per_s_repeats"]) for p in pts]) * y
            hi = np.array([p["tokens_per_s"] / min(p["tokens_per_s_repeats"]) for p in pts]) * y
            ax.errorbar(n, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label="measured (median, range of repeats)")
        else:
            ax.scatter(n, y, label="measured")
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
        f = costs[key]["fit"]
        iv = f.get("interval", {}).get("b")
        band = f" (b {iv[0]:.2f}..{iv[1]:.2f})" if iv else ""
        ax.plot(grid, scale * f["a"] * grid ** f["b"], "--", label=f"fit: {f['a'] * scale:.3g} N^{f['b']:.2f}{band}")
        ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel=label, title=key)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    mlflow.log_artifact(str(path), artifact_path="figures")


def cmd_measure(args) -> None:
    from drscaling import costs, tracking
    from drscaling.cost_stats import format_fit
    from drscaling.serving import TritonServer
    from drscaling.sweep import run_ids

    cfg = params.section("measure")
    out = Path(args.out or params.section("budget").get("costs_path") or COSTS)
    load = {k: cfg[k] for k in ("batch_sizes", "concurrency", "duration_s", "seq_len", "protocol", "query_seq_len",
                                "query_concurrency", "passage_batch", "passage_seq_len", "passage_concurrency",
                                "repeats", "max_spread") if k in cfg}
    if args.repeats is not None:
        load["repeats"] = args.repeats
    price = cfg.get("device_hour_usd", 3.93)
    preset = args.preset or params.section("sweep").get("preset")
    # Training $/step from exactly the runs behind this preset's results (an older preset of the same
    # name may have used another step shape); without results, every training run of the experiment.
    sweeps = Path(f"{A}/sweeps/{preset}")
    runs = run_ids(sweeps) or None
    common = {"experiment_name": args.train_experiment, "preset": preset, "runs": runs, "device_hour_usd": price,
              "sweep_path": out.with_name("load.json")}
    with tracking.stage_run("measure", "measure", {"drscaling.stage": "measure"}):
        if args.url:
            result = costs.measure_costs(args.url, out, **common, **load)
        else:
            # The server log stays out of the (possibly versioned) costs folder.
            with TritonServer(args.repo, log_path=Path(f"{A}/costs/triton.log")) as server:
                print(f"Triton ready at {server.http_url} (HTTP), {server.grpc_url} (gRPC); log {server.log_path}")
                result = costs.measure_costs(server, out, **common, **load)
        _cost_figure(result, out.with_name("cost_vs_n.png"))
    print(f"{result['repeats']} repeats per setting on {result['device']} (load average at start "
          f"{result['machine'].get('loadavg_1m_start')}, {result['machine'].get('usable_cpus')} usable cores)")
    for p in result["inference"]["points"]:
        spread = f"  spread {p['tokens_per_s_spread']:.0%}" if "tokens_per_s_spread" in p else ""
        print(f"  {p['shape']:14} N={p['n']:>10}  {p['tokens_per_s']:>10.0f} tokens/s{spread}  "
              f"${p['usd_per_million_tokens']:.4f} per 1M tokens")
    for t in result.get("towers", []):
        if t["tower"] == "query":
            lat = ", ".join(f"c={x['concurrency']}: p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms, "
                            f"{x['queries_per_s']:.0f} q/s" for x in t["latency"])
            print(f"  query tower   {t['model']:22} {t['shape']:14} batch 1 x {t['seq_len']} tokens: {lat}")
        else:
            print(f"  passage tower {t['model']:22} {t['shape']:14} batch {t['batch']} x {t['seq_len']} tokens: "
                  f"{t['passages_per_s']:.3g} passages/s, {t['tokens_per_s']:.0f} tokens/s")
    print("inference cost fit: " + format_fit(result["inference"]["fit"], "$/token"))
    if "training" in result:
        print("training cost fit:  " + format_fit(result["training"]["fit"], "$/step"))
    # measure() printed each warning when it found it; the file keeps them.
    print(f"costs written to {out}" + (f" with {len(result['flags'])} warning(s) in its 'flags'" if result["flags"] else ""))


# ---------------------------------------------------------------------------------------------


def _annotate_parser(p: argparse.ArgumentParser) -> None:
    from drscaling.annotation import sources
    from drscaling.annotation.bounds import REQUEST_ATTEMPTS, REQUEST_TIMEOUT_S, request_bound_s

    listed = "; ".join(f"{s.name}: {s.summary} (cost: {s.pricing})" for s in sources.REGISTRY.values())
    p.add_argument("--source", required=True, choices=sources.names(), help=listed)
    p.add_argument("--prepared")
    p.add_argument("--out", help=f"pairs file (default {A}/annotations/<source>.jsonl; its GX report goes to "
                                 f"{A}/validation/, or beside a given --out as <name>.validation.json). It and its "
                                 "cost file appear only once the pairs pass the checks; rejected pairs go to "
                                 "<name>.rejected.jsonl")
    p.add_argument("--regenerate", action="store_true",
                   help="llm/supervised: generate now instead of using the shipped data/generated/<source>.jsonl")
    p.add_argument("--limit", type=int, help="llm/supervised: annotate only the first N passages (seeded order)")
    p.add_argument("--model", help="llm: local folder, .gguf, hub name, or the endpoint's model name")
    p.add_argument("--endpoint", help="llm: OpenAI-compatible base URL (key from DRSCALING_LLM_API_KEY / OPENAI_API_KEY); "
                                      "redirects are refused, plain http to a non-loopback host is warned about")
    bound = request_bound_s(REQUEST_TIMEOUT_S, REQUEST_ATTEMPTS)
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"--endpoint: one attempt's wait to connect and for the answer (default {REQUEST_TIMEOUT_S:g}; "
                        "the answer comes when generation ends: raise it for a slow server)")
    p.add_argument("--attempts", type=int,
                   help=f"--endpoint: tries per request on timeouts, resets and HTTP 408/429/5xx (default "
                        f"{REQUEST_ATTEMPTS}); a request gives up after attempts x timeout + backoff "
                        f"(1 s, 2 s, ...): {bound:g} s with the defaults")
    p.add_argument("--restart", action="store_true",
                   help="--regenerate: discard a partial run made with other settings instead of refusing to mix them")


def sources_names() -> tuple[str, ...]:
    from drscaling.annotation import sources

    return sources.names()


def build_parser() -> argparse.ArgumentParser:
    from drscaling.distill import DistillConfig
    from drscaling.evaluate import EvalConfig
    from drscaling.train import TrainConfig

    ap = argparse.ArgumentParser(prog="drscaling", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    data = cmd("data", None, "dataset tools: rebuild the Debian snapshot, import MS MARCO or pairs")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("extract-debian", help="rebuild data/debian/pairs.jsonl from the Debian archive (needs apt access)")
    p.add_argument("--dest", default="data/debian/pairs.jsonl")
    p.add_argument("--lists-dir", default=f"{A}/apt-lists", help="private apt lists folder")
    p.add_argument("--no-fetch", action="store_true", help="use lists already in --lists-dir")
    p.set_defaults(func=cmd_extract_debian)
    p = dsub.add_parser("import", help="import a dataset into the canonical format",
                        description="Import a dataset into the canonical format (train/dev/test). The dataset "
                                    "is written to a temporary folder and renamed onto DEST at the end: on any "
                                    "error DEST is left as it was. Dropped rows are counted in the report.")
    p.add_argument("--format", choices=["msmarco", "pairs", "beir", "ir_datasets"], required=True)
    p.add_argument("src", help="msmarco: folder of collection/queries/qrels TSVs; pairs: JSONL of {query, passage}; "
                               "beir: folder of corpus.jsonl, queries.jsonl, qrels/<split>.tsv; "
                               "ir_datasets: a dataset id such as msmarco-passage/train or beir/scifact "
                               "(needs `pip install ir-datasets`, and network to download)")
    p.add_argument("dest", help="output dataset folder (train/dev/test); an existing dataset there is replaced")
    p.add_argument("--dev-size", type=int, help="pairs: dev pairs, counted after de-duplication (default: "
                   "params.yaml data.dev_size, scaled down when the data is small); beir/ir_datasets: "
                   "pairs carved for dev when it shares its source with another split")
    p.add_argument("--test-size", type=int, help="as --dev-size, for test")
    p.add_argument("--split", action="append", metavar="NAME=SOURCE",
                   help="beir/ir_datasets: where split NAME (train, dev, test) comes from: a qrels/<SOURCE>.tsv "
                        "file or an ir_datasets (sub-)id; splits naming the same source are carved out of it by "
                        "query group, e.g. --split dev=train. Default: each split from its own name")
    p.add_argument("--seed", type=int, help="seed of the carving (default: params.yaml data.seed)")
    p.set_defaults(func=cmd_import)

    p = cmd("prepare", cmd_prepare, "split the Debian snapshot into canonical train/dev/test")
    p.add_argument("--raw")
    p.add_argument("--prepared")
    p = cmd("validate", cmd_validate, "Great Expectations gate over every split")
    p.add_argument("--prepared")
    p.add_argument("--report", default=f"{A}/validation/dataset.json")
    p = cmd("tokenizer", cmd_tokenizer, "train the shared WordPiece vocabulary on the train split")
    p.add_argument("--prepared")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--out", default=f"{A}/tokenizer")
    _annotate_parser(cmd("annotate", cmd_annotate, "produce, validate and publish training pairs from one annotation source"))

    for name, func, help in (("train", cmd_train, "train one encoder (one MLflow run)"),
                             ("sweep", cmd_sweep, "run a preset's model/data/source/joint sweeps")):
        p = cmd(name, func, help)
        p.add_argument("--prepared")
        p.add_argument("--annotations", help=f"folder of <source>.jsonl (default {A}/annotations)")
        p.add_argument("--tokenizer", help=f"shared tokenizer folder (default {A}/tokenizer)")
        p.add_argument("--out")
        if name == "train":
            p.add_argument("--section", help="params.yaml section whose values override the train section's")
            p.add_argument("--discard-checkpoint", action="store_true",
                           help="start afresh when --out holds an unusable checkpoint (corrupt, or made on other data)")
            params.add_flags(p, TrainConfig)
        else:
            p.add_argument("--preset", help="preset name in pipelines/ or a YAML path")
            p.add_argument("--only", choices=["model", "data", "source", "joint"], help="run one sweep of the preset")
            p.add_argument("--executor", choices=["local", "ray"],
                           help="local: points one after another here; ray: each point a task on a Ray cluster"
                                " (default: params sweep.executor, else local)")
            p.add_argument("--ray-address", help="the cluster's head, host:6379 (default: params sweep.ray.address,"
                                                 " else RAY_ADDRESS or a local cluster)")

    p = cmd("study", cmd_study, "scaling laws for your own data: import, annotate, sweeps sized to the data, fit, "
            "budget and report in one command (one MLflow experiment; --dvc: a DVC pipeline in the study folder)")
    p.add_argument("data", help="pairs: a JSONL file of {query, passage}; msmarco/beir: a folder; ir_datasets: an id")
    p.add_argument("--format", choices=["pairs", "msmarco", "beir", "ir_datasets"], default="pairs")
    p.add_argument("--preset", default="quick", help="sweep preset to size to the data (name in pipelines/ or a YAML "
                                                     "path; default quick, the CPU preset)")
    p.add_argument("--out", type=Path, help="study folder (default studies/<name>); reruns resume there")
    p.add_argument("--name", help="study name (default: from DATA's file name); the MLflow experiment is study-<name>")
    p.add_argument("--sources", nargs="+", default=["human"], choices=sources_names(),
                   help="annotation sources to annotate and sweep (default human; ict is free; supervised and llm "
                        "generate queries for this data, slowly on a CPU, and are priced by what they cost)")
    p.add_argument("--dvc", action="store_true", help="make the study folder a DVC project (the data `dvc add`ed, "
                   "the stages in its dvc.yaml) and run the sweeps onwards with `dvc repro`")
    p.add_argument("--new-data-version", action="store_true",
                   help="accept DATA for a study folder made from other data (its next data version)")
    p.add_argument("--n-bootstrap", type=int, help="bootstrap refits per law (default: params.yaml fit.n_bootstrap)")
    p.add_argument("--costs-path", help="measured costs JSON (default costs/costs.json in the project; the paper's "
                                        "cost model when absent)")

    p = cmd("distill", cmd_distill, "distil a trained large query tower into a small one (ScalingNote stage 2)")
    p.add_argument("--teacher", required=True, help="trained model or run folder (e.g. dual smollm2-135m towers)")
    p.add_argument("--baseline", help="a small model trained end to end on the same data and steps, to compare with")
    p.add_argument("--prepared")
    p.add_argument("--annotations", help=f"folder of <source>.jsonl (default {A}/annotations)")
    p.add_argument("--tokenizer", help=f"shared tokenizer folder (default {A}/tokenizer)")
    p.add_argument("--out", help=f"output folder: model/ and metrics.json (default {A}/towers/distilled)")
    params.add_flags(p, DistillConfig)

    p = cmd("evaluate", cmd_evaluate, "contrastive entropy and ranking metrics of any saved model")
    p.add_argument("--model", required=True, help="drscaling model folder, any HF encoder folder, an MLflow run "
                   "(runs:/<id>/model or its id) or a registered model (models:/drscaling-<shape>@recommended)")
    p.add_argument("--prepared", help="canonical dataset folder")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--no-mlflow", action="store_true")
    params.add_flags(p, EvalConfig)

    p = cmd("fit", cmd_fit, "fit L(N), L(D), L(D) per source and L(N,D) to a preset's sweep results")
    p.add_argument("--preset")
    p.add_argument("--n-bootstrap", type=int, help="bootstrap refits per law (default: params.yaml fit.n_bootstrap)")
    p.add_argument("--sources", nargs="+", help="annotation sources to fit D@<source> for (default: every source "
                   "with points); a source without points is an error")
    p.add_argument("--workers", type=int, help="processes for the bootstrap refits (default: min(2, CPUs))")
    p.add_argument("--bootstrap-method", choices=["parametric", "pairs"],
                   help="interval method (default parametric: see drscaling/laws/bootstrap.py)")
    p.add_argument("--sweeps", help=f"folder holding <preset>/results-*.jsonl (default {A}/sweeps)")
    p.add_argument("--out", help=f"default {A}/laws")
    p = cmd("report", cmd_report, "write the Markdown report (coefficient tables, figures, budget)")
    p.add_argument("--laws")
    p.add_argument("--budget-json")
    p.add_argument("--out", default=f"{A}/report/report.md")
    p = cmd("budget", cmd_budget, "optimal model size and annotation amount for a budget (paper section 5)")
    # An empty value ("", as MLproject passes for a parameter left at its default) means: not given.
    p.add_argument("--budget", type=_opt_float, help="dollars (default: params.yaml budget.budget)")
    p.add_argument("--include-inference", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--costs", type=_costs_mode, metavar="{paper,measured}",
                   help="paper: eq. 12-14 from their parts; measured: the costs stage's file (default: params.yaml "
                        "budget.costs; paper with a published law set)")
    p.add_argument("--costs-path", help=f"measured costs JSON (default: params.yaml budget.costs_path, else {COSTS}: "
                                        "the versioned costs `make measure` writes)")
    p.add_argument("--source", help="annotation source whose $/pair is Zdata (measured mode)")
    p.add_argument("--steps", type=int)
    p.add_argument("--corpus-pages", type=float)
    p.add_argument("--tokens-per-page", type=float)
    p.add_argument("--laws", type=_opt_str, metavar="LAWS_JSON|SET",
                   help=f"the laws: a laws.json from `drscaling fit` (default {A}/laws/laws.json), or a law set "
                        "the paper published: 'paper' (= 'paper-msmarco': Table 1 L(N), Table 2 L(D) and the joint "
                        "law of eqs. 8-10 on MS MARCO) or 'paper-t2ranking' (Tables 1 and 2 only: the paper gives "
                        "no joint law for T2Ranking, which the budget needs, so it is refused with a note). A set "
                        "needs no fit and no artifacts, defaults to --costs paper and writes to "
                        f"{A}/budget-paper: `drscaling budget --laws paper --costs paper` reproduces Section 5 "
                        "(Figs 7/8)")
    p.add_argument("--law", type=_opt_str, help="which joint law of the laws to use (default ND, the paper's eq. 8; "
                                                "any law of both N and D)")
    p.add_argument("--out", type=_opt_str, help=f"result folder (default {A}/budget, the DVC stage's output; "
                                                f"{A}/budget-paper with a published law set)")
    p.add_argument("--extrapolation-factor", type=float,
                   help="flag an optimum more than this factor outside the fitted N or D range, either "
                        "direction (default: params.yaml budget.extrapolation_factor, else 2)")
    p.add_argument("--negatives", type=int,
                   help="evaluation negatives K: a predicted CE >= ln(K + 1) is flagged meaningless (default: "
                        "the laws' metadata, else params.yaml train.eval.negatives, else 256)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the result to MLflow")
    p.add_argument("--show-derivation", action="store_true", help="print eq. 12-14 from their parts")
    p.add_argument("--towers", metavar="METRICS_JSON",
                   help="compare dual-tower deployments instead (large; large passage + distilled query; small) "
                        "from `drscaling distill`'s metrics.json; writes <out>/towers.json (default out "
                        f"{A}/budget-towers); uses --budget, --costs, --costs-path, --corpus-pages, --tokens-per-page")
    p.add_argument("--query-volume", type=float, help="--towers: queries served over the deployment's life")
    p.add_argument("--tokens-per-query", type=float, help="--towers: tokens per query")
    p.add_argument("--usd-per-pair", type=float,
                   help="--towers: $/pair for entries that record 'pairs' but no 'annotation_usd'")
    cmd("summary", cmd_summary, "print the fitted laws and the budget recommendation")

    p = cmd("export", cmd_export, "export trained encoders to ONNX (+ optimised variants) and a Triton repository")
    p.add_argument("--model", help="model folder, runs:/<run id>/model, a run id, or models:/<name>@<alias>; a dual-tower folder "
                                   "(query/ + passage/) exports to <out>/query and <out>/passage and is "
                                   "served as <name>-query and <name>-passage")
    p.add_argument("--name", help="model name in the repository (default: from the folder)")
    p.add_argument("--from-sweep", metavar="PRESET", help="export every shape of that preset's model sweep")
    p.add_argument("--sweeps", help=f"--from-sweep: folder holding <preset>/results-*.jsonl (default {A}/sweeps)")
    p.add_argument("--variants", nargs="+", choices=["fp32", "opt", "fp16", "int8"])
    p.add_argument("--out", help=f"default {A}/export")
    p.add_argument("--repo", help="also write a Triton model repository here")
    p.add_argument("--prepared")
    p.add_argument("--no-quality", action="store_true",
                   help="skip scoring each variant's test contrastive entropy (parity is still checked); "
                        "for fp32-only exports of large towers, where the score costs minutes on a CPU")
    p = cmd("serve", cmd_serve, "run Triton on a model repository (127.0.0.1) until Ctrl-C")
    p.add_argument("--repo", default=f"{A}/serving/repo")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", help="server log file")
    for name, func, help in (("encode", cmd_encode, "embed texts with a served encoder"),
                             ("index", cmd_index, "embed a corpus (JSONL pid,text) with a served encoder"),
                             ("search", cmd_search, "top-k passages of an index for a query")):
        p = cmd(name, func, help)
        p.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton (HTTP or gRPC port)")
        p.add_argument("--protocol", choices=["http", "grpc"], default="http")
        p.add_argument("--model", required=True,
                       help="model name in the repository; for dual towers the pair's name NAME (queries go "
                            "through NAME-query, passages through NAME-passage) or a tower's own name")
        p.add_argument("--tokenizer", help="tokenizer folder (default: <repo>/<model>/1/tokenizer)")
        p.add_argument("--repo", default=f"{A}/serving/repo",
                       help="the model repository the server runs on: each model's tokenizer is read from it")
        p.add_argument("--server-tokenize", action="store_true",
                       help="send the texts as they are to the model's <model>-text ensemble, which tokenises "
                            "them in Triton (same embeddings; no tokenizer or --repo needed here)")
        if name == "encode":
            p.add_argument("--role", choices=["query", "passage"],
                           help="embed the texts as queries or passages: picks the pair's tower and the "
                                "truncation length (default: the model as named, passage length)")
            p.add_argument("texts", nargs="*")
            p.add_argument("--file", help="one text per line")
            p.add_argument("--out", help="write embeddings as .npy")
        elif name == "index":
            p.add_argument("--corpus", required=True)
            p.add_argument("--out", required=True)
            _index_flags(p, build=True)
        else:
            p.add_argument("--index", required=True)
            p.add_argument("-k", type=int, default=10)
            p.add_argument("query")
            _index_flags(p, build=False)
    p = cmd("measure", cmd_measure, "load-test served encoders on Triton and fit $ per token (and $ per step) against N; "
            "query towers: latency at batch 1 (concurrency 1 and 8), passage towers: throughput at batch 32")
    p.add_argument("--repo", default=f"{A}/serving/repo", help="start Triton on this repository")
    p.add_argument("--url", help="measure an already running server instead")
    p.add_argument("--train-experiment", default="sweeps", help="MLflow experiment holding the training runs")
    p.add_argument("--preset", help="training cost from this sweep preset's runs (default: params sweep.preset)")
    p.add_argument("--out", help=f"costs JSON; load.json and cost_vs_n.png go beside it (default: params.yaml "
                                 f"budget.costs_path, else {COSTS}, the versioned costs the budget reads)")
    p.add_argument("--repeats", type=int, help="measure each load setting this often; the costs use the median "
                                               "(default: params.yaml measure.repeats, else 3)")
    return ap


def _index_flags(p: argparse.ArgumentParser, build: bool) -> None:
    """FAISS flags of `index` (the index type and its settings) and `search` (search-time settings)."""
    from drscaling.vector_index import INDEX_TYPES, IndexConfig

    d = IndexConfig()
    if build:
        p.add_argument("--index-type", choices=INDEX_TYPES, default=d.index_type,
                       help="flat: exact inner product; ivf / hnsw: approximate, for large corpora")
        p.add_argument("--nlist", type=int, help="ivf: number of lists (default 4*sqrt(passages), at most passages/39)")
        p.add_argument("--hnsw-m", type=int, help=f"hnsw: links per node (default {d.hnsw_m})")
        p.add_argument("--ef-construction", type=int, help=f"hnsw: candidates kept while building (default {d.ef_construction})")
    nprobe, ef = (d.nprobe, d.ef_search) if build else ("the index's own",) * 2
    p.add_argument("--nprobe", type=int, help=f"ivf: lists scanned per query (default {nprobe})")
    p.add_argument("--ef-search", type=int, help=f"hnsw: candidates kept per query (default {ef})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from drscaling import tracking

    tracking.attach_project_run()
    try:
        args.func(args)
    except DrscalingError as exc:
        print(f"drscaling: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM at a step boundary (train.Terminated)
        print(f"drscaling: stopped: {exc or 'interrupted'}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
