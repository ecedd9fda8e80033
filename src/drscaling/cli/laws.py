"""Law and decision commands: fit, report, budget (and its dual-tower comparison), summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from drscaling import params
from drscaling.cli.common import A, COSTS, Register, costs_mode, opt_float, opt_str, params_flag, picker
from drscaling.design import PAPER_BUDGET, POINTS_FILE


def cmd_fit(args) -> None:
    """Fit every registered law form to the preset's sweep results; print each law with its points,
    dof, intervals, held-out errors and flags. params.yaml `fit:` may set n_bootstrap, seed,
    holdout_largest, sources (the annotation sources to fit: each must have points), workers and
    bootstrap_method; flags override them."""
    from drscaling import laws, tracking
    from drscaling.files import write_jsonl
    from drscaling.sweep import merge_results

    preset = args.preset or params.section("sweep").get("preset", "quick")
    pick = picker(args, "fit")
    out = Path(args.out or f"{A}/laws")
    points = out / POINTS_FILE
    sweeps = Path(args.sweeps or f"{A}/sweeps") / preset
    write_jsonl(points, merge_results(sweeps))
    summary = laws.fit_sweep(points, out, n_bootstrap=int(pick("n_bootstrap", 1000)), seed=int(pick("seed", 0)),
                             holdout_largest=int(pick("holdout_largest", 1)), sources=pick("sources"),
                             workers=pick("workers"), bootstrap_method=pick("bootstrap_method", "parametric"))
    with tracking.stage_run("laws", f"fit-{preset}", {"drscaling.stage": "fit", "preset": preset}):
        laws.log_to_mlflow(summary)
    laws.figures_to_sweep_parents(sweeps, summary.get("figures") or {})
    print(laws.format_fits(laws.load_laws(summary["laws_path"]), summary.get("skipped")))


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


def cmd_budget(args) -> None:
    from drscaling import budget as B

    cfg = params.section("budget")
    pick = picker(args, "budget")
    if args.towers:
        return cmd_budget_towers(args)
    laws = args.laws or f"{A}/laws/laws.json"
    published = laws in B.LAW_SETS
    # A published law set reproduces the paper: its costs unless --costs says otherwise, no artifacts read,
    # and a result folder that is not the pipeline's DVC output.
    mode = args.costs or ("paper" if published else cfg.get("costs", "paper"))
    out = Path(args.out or (f"{A}/budget-paper" if published else f"{A}/budget"))
    scale = cfg.get("measured") or {}
    ann_cost = Path(f"{A}/annotations/{pick('source', 'human')}.cost.json")
    shapes, runs = (None, None) if published else B.trained_runs(laws)
    eval_negatives = (params.section("train").get("eval") or {}).get("negatives")

    def workload(name: str):  # paper mode keeps the paper's own corpus and steps unless given here
        return getattr(args, name) if mode == "paper" else getattr(args, name) or scale.get(name)

    result = B.run_budget(
        laws, float(pick("budget", PAPER_BUDGET)), bool(pick("include_inference", False)),
        mode, pick("costs_path", COSTS) if mode == "measured" else None, out,
        annotation_cost_path=ann_cost if mode == "measured" and ann_cost.exists() and not published else None,
        source_cost_paths=[] if published else sorted(Path(f"{A}/annotations").glob("*.cost.json")),
        steps=workload("steps"), corpus_pages=workload("corpus_pages"), tokens_per_page=workload("tokens_per_page"),
        shapes=shapes, measured_runs=runs,
        extrapolation_factor=float(pick("extrapolation_factor", B.EXTRAPOLATION_FACTOR)),
        negatives=args.negatives, default_negatives=int(eval_negatives) if eval_negatives else None,
        law=args.law or "ND",
    )
    picked = None if args.no_mlflow else B.log_budget(
        result, out, mode, published, pick("costs_path", COSTS) if mode == "measured" else None)
    if args.show_derivation or mode == "paper":
        print("\n".join(B.paper_derivation()))
    print(B.format_recommendation(result))
    if not args.no_mlflow and not published:
        print(f"MLflow registry: {picked['uri']} = version {picked['version']} ({picked['why']})" if picked else
              "MLflow registry: no registered version of the picked run (trained before models were registered,"
              " or in another tracking store); @recommended not set")
    print(f"written to {out / 'budget.json'}")


def cmd_budget_towers(args) -> None:
    """Which dual-tower deployment for the budget: large / large passage + distilled query / small."""
    from drscaling import budget as B

    pick = picker(args, "budget")
    # Each workload number: the flag, else params budget.towers, else budget.measured (the corpus), else the default.
    cfg = params.section("budget")
    workload = B.workload_from(vars(args), cfg.get("towers") or {}, cfg.get("measured") or {})
    mode = pick("costs", "measured")
    out = Path(args.out or f"{A}/budget-towers")
    costs_path = pick("costs_path", COSTS) if mode == "measured" else None
    result = B.run_tower_budget(args.towers, float(pick("budget", PAPER_BUDGET)), mode, costs_path, out, workload)
    B.log_towers(result, out, mode, args.towers)
    print(B.format_tower_comparison(result))
    print(f"written to {out / 'towers.json'}")


def cmd_summary(args) -> None:
    """What the default pipeline produced, from its files (also when `dvc repro` had nothing to do)."""
    from drscaling.report import pipeline_summary

    print(pipeline_summary(A))


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------


def _fit_report_parsers(cmd: Register) -> None:
    p = cmd("fit", cmd_fit, "fit L(N), L(D), L(D) per source and L(N,D) to a preset's sweep results")
    params_flag(p, "--preset", "sweep.preset", "the preset whose sweep results to fit", "quick")
    params_flag(p, "--n-bootstrap", "fit.n_bootstrap", "bootstrap refits per law", 1000, type=int)
    params_flag(p, "--sources", "fit.sources", "annotation sources to fit D@<source> for; a source without points "
                "is an error", "every source with points", nargs="+")
    params_flag(p, "--workers", "fit.workers", "processes for the bootstrap refits", "min(2, CPUs)", type=int)
    params_flag(p, "--bootstrap-method", "fit.bootstrap_method", "interval method (see drscaling/laws/bootstrap.py)",
                "parametric", choices=["parametric", "pairs"])
    p.add_argument("--sweeps", help=f"folder holding <preset>/results-*.jsonl (default {A}/sweeps)")
    p.add_argument("--out", help=f"default {A}/laws")
    p = cmd("report", cmd_report, "write the Markdown report (coefficient tables, figures, budget)")
    p.add_argument("--laws", help=f"laws.json to report (default {A}/laws/laws.json)")
    p.add_argument("--budget-json", help=f"budget result to report (default {A}/budget/budget.json, when it exists)")
    p.add_argument("--out", default=f"{A}/report/report.md", help="Markdown file to write (default: %(default)s)")


def _budget_parser(p: argparse.ArgumentParser) -> None:
    # An empty value ("", as MLproject passes for a parameter left at its default) means: not given.
    params_flag(p, "--budget", "budget.budget", "dollars", PAPER_BUDGET, type=opt_float)
    params_flag(p, "--include-inference", "budget.include_inference", "recommend with the inference cost of the "
                "corpus included (Fig 8) or without it (Fig 7)", False, action=argparse.BooleanOptionalAction,
                default=None)
    params_flag(p, "--costs", "budget.costs", "paper: eq. 12-14 from their parts; measured: the costs stage's file",
                "paper", "paper with a published law set", type=costs_mode, metavar="{paper,measured}")
    params_flag(p, "--costs-path", "budget.costs_path", "measured costs JSON (the versioned costs `make measure` "
                "writes)", COSTS)
    params_flag(p, "--source", "budget.source", "annotation source whose $/pair is Zdata (measured mode)", "human")
    for flag, what, kind in (("steps", "training steps per run", int), ("corpus_pages", "passages in the corpus to "
                             "encode", float), ("tokens_per_page", "tokens per passage", float)):
        params_flag(p, "--" + flag.replace("_", "-"), f"budget.measured.{flag}", f"{what}: what measured costs are "
                    "scaled to", note="--costs paper: the paper's own unless given", type=kind)
    p.add_argument("--laws", type=opt_str, metavar="LAWS_JSON|SET",
                   help=f"the laws: a laws.json from `drscaling fit` (default {A}/laws/laws.json), or a law set "
                        "the paper published: 'paper' (= 'paper-msmarco': Table 1 L(N), Table 2 L(D) and the joint "
                        "law of eqs. 8-10 on MS MARCO) or 'paper-t2ranking' (Tables 1 and 2 only: the paper gives "
                        "no joint law for T2Ranking, which the budget needs, so it is refused with a note). A set "
                        "needs no fit and no artifacts, defaults to --costs paper and writes to "
                        f"{A}/budget-paper: `drscaling budget --laws paper --costs paper` reproduces Section 5 "
                        "(Figs 7/8)")
    p.add_argument("--law", type=opt_str, help="which joint law of the laws to use (default ND, the paper's eq. 8; "
                                               "any law of both N and D)")
    p.add_argument("--out", type=opt_str, help=f"result folder (default {A}/budget, the DVC stage's output; "
                                               f"{A}/budget-paper with a published law set)")
    params_flag(p, "--extrapolation-factor", "budget.extrapolation_factor", "flag an optimum more than this factor "
                "outside the fitted N or D range, either direction", 2, type=float)
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


def register(cmd: Register) -> None:
    _fit_report_parsers(cmd)
    _budget_parser(cmd("budget", cmd_budget, "optimal model size and annotation amount for a budget (paper section 5)"))
    cmd("summary", cmd_summary, "print the fitted laws and the budget recommendation")
