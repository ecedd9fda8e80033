"""Deployment commands: export, serve, encode, index, search, measure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from drscaling import params
from drscaling.cli.common import A, COSTS, Register, params_flag, prepared, prepared_flag
from drscaling.errors import DrscalingError


def cmd_export(args) -> None:
    from drscaling.evaluate import EvalConfig
    from drscaling.export_stage import export_lines, export_one, export_targets

    eval_cfg = params.build(EvalConfig, params.section("train").get("eval", {}))
    serve_cfg = params.section("serving")
    variants = args.variants or serve_cfg.get("variants", ["fp32", "int8"])
    data = prepared(args)
    repo = Path(args.repo) if args.repo else None
    targets = export_targets(args.model, args.name, Path(args.sweeps or f"{A}/sweeps"), args.from_sweep)
    out_root = Path(args.out or f"{A}/export")
    for name, model in targets.items():
        result = export_one(model, out_root / name if len(targets) > 1 or args.from_sweep else out_root, variants,
                            data, eval_cfg, repo, name, serve_cfg, quality=not args.no_quality)
        print("\n".join(export_lines(name, variants, result, served=repo is not None)))
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
    from drscaling.vector_index import config_from

    index = config_from(index_type=args.index_type, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
                        ef_construction=args.ef_construction, ef_search=args.ef_search)
    section = params.section("index")
    if (args.executor or section.get("executor", "local")) == "ray":
        from drscaling.serving.index_ray import RayIndexConfig, build_index_ray

        if args.server_tokenize:
            raise DrscalingError("--server-tokenize is for --executor local (Triton): with ray, the actors tokenise")
        cfg = params.build(RayIndexConfig, dict(section.get("ray") or {}))
        for flag, name in (("ray_address", "address"), ("concurrency", "concurrency"), ("num_gpus", "num_gpus")):
            if getattr(args, flag) is not None:
                setattr(cfg, name, getattr(args, flag))
        info = build_index_ray(args.repo, args.model, args.corpus, args.out, cfg, index, tokenizer=args.tokenizer)
    else:
        from drscaling.serving import build_index

        info = build_index(args.url, args.model, args.corpus, args.out, protocol=args.protocol,
                           tokenizer=args.tokenizer, repo=args.repo, index=index, server_tokenize=args.server_tokenize)
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


def cmd_measure(args) -> None:
    from drscaling.measure_stage import LOAD_KEYS, measure_lines, measure_stage
    from drscaling.sweep import run_ids

    cfg = params.section("measure")
    out = Path(args.out or params.section("budget").get("costs_path") or COSTS)
    load = {k: cfg[k] for k in LOAD_KEYS if k in cfg}
    if args.repeats is not None:
        load["repeats"] = args.repeats
    preset = args.preset or params.section("sweep").get("preset")
    # Training $/step from exactly the runs behind this preset's results (an older preset of the same
    # name may have used another step shape); without results, every training run of the experiment.
    runs = run_ids(Path(f"{A}/sweeps/{preset}")) or None
    common = {"experiment_name": args.train_experiment, "preset": preset, "runs": runs,
              "device_hour_usd": cfg.get("device_hour_usd", 3.93), "sweep_path": out.with_name("load.json")}
    result = measure_stage(args.url, args.repo, out, Path(f"{A}/costs/triton.log"), common, load)
    print("\n".join(measure_lines(result)))
    # measure() printed each warning when it found it; the file keeps them.
    print(f"costs written to {out}" + (f" with {len(result['flags'])} warning(s) in its 'flags'" if result["flags"] else ""))


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------


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


def _executor_flags(p: argparse.ArgumentParser) -> None:
    """`index --executor ray`: the corpus embedded by Ray Data actors running the repository's graph."""
    from drscaling.executors import EXECUTORS

    params_flag(p, "--executor", "index.executor", "local: embed on the Triton server at --url; ray: Ray Data actors on "
                "a cluster run the model of --repo in-process (onnxruntime, a GPU each where the cluster has them)",
                "local", choices=EXECUTORS)
    params_flag(p, "--ray-address", "index.ray.address", "ray: the cluster's head, host:6379",
                note="empty: RAY_ADDRESS, else a local cluster")
    params_flag(p, "--concurrency", "index.ray.concurrency", "ray: encoder actors", 0,
                note="0: one per GPU where the cluster has GPUs, else one per CPU", type=int)
    params_flag(p, "--num-gpus", "index.ray.num_gpus", "ray: GPUs per actor",
                note="none: 1 where the cluster has GPUs, else 0", type=float)


def _export_serve_parsers(cmd: Register) -> None:
    p = cmd("export", cmd_export, "export trained encoders to ONNX (+ optimised variants) and a Triton repository")
    p.add_argument("--model", help="model folder, runs:/<run id>/model, a run id, or models:/<name>@<alias>; a dual-tower folder "
                                   "(query/ + passage/) exports to <out>/query and <out>/passage and is "
                                   "served as <name>-query and <name>-passage")
    p.add_argument("--name", help="model name in the repository (default: from the folder)")
    p.add_argument("--from-sweep", metavar="PRESET", help="export every shape of that preset's model sweep")
    p.add_argument("--sweeps", help=f"--from-sweep: folder holding <preset>/results-*.jsonl (default {A}/sweeps)")
    params_flag(p, "--variants", "serving.variants", "ONNX variants to export and score", ["fp32", "int8"],
                nargs="+", choices=["fp32", "opt", "fp16", "int8"])
    p.add_argument("--out", help=f"default {A}/export")
    p.add_argument("--repo", help="also write a Triton model repository here")
    prepared_flag(p, "canonical dataset folder (its test split scores the variants)")
    p.add_argument("--no-quality", action="store_true",
                   help="skip scoring each variant's test contrastive entropy (parity is still checked); "
                        "for fp32-only exports of large towers, where the score costs minutes on a CPU")
    p = cmd("serve", cmd_serve, "run Triton on a model repository (127.0.0.1) until Ctrl-C")
    p.add_argument("--repo", default=f"{A}/serving/repo", help="the model repository (default: %(default)s)")
    for kind, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        p.add_argument(f"--{kind}-port", type=int, default=port, help=f"{kind} port, 0 for any free one (default: %(default)s)")
    p.add_argument("--log", help="server log file")


def _client_parsers(cmd: Register) -> None:
    for name, func, help in (("encode", cmd_encode, "embed texts with a served encoder"),
                             ("index", cmd_index, "embed a corpus (JSONL pid,text) with a served encoder"),
                             ("search", cmd_search, "top-k passages of an index for a query")):
        p = cmd(name, func, help)
        p.add_argument("--url", default="127.0.0.1:8000", help="host:port of Triton (HTTP or gRPC port)")
        p.add_argument("--protocol", choices=["http", "grpc"], default="http",
                       help="how to talk to --url (default: %(default)s)")
        p.add_argument("--model", required=True,
                       help="model name in the repository; for dual towers the pair's name NAME (queries go "
                            "through NAME-query, passages through NAME-passage) or a tower's own name")
        p.add_argument("--tokenizer", help="tokenizer folder (default: <repo>/<model>/1/tokenizer)")
        p.add_argument("--repo", default=f"{A}/serving/repo",
                       help="the model repository the server runs on: each model's tokenizer is read from it"
                            + (" (--executor ray: and the model.onnx the actors run)" if name == "index" else ""))
        p.add_argument("--server-tokenize", action="store_true",
                       help="send the texts as they are to the model's <model>-text ensemble, which tokenises "
                            "them in Triton (same embeddings; no tokenizer or --repo needed here)")
        if name == "encode":
            p.add_argument("--role", choices=["query", "passage"],
                           help="embed the texts as queries or passages: picks the pair's tower and the "
                                "truncation length (default: the model as named, passage length)")
            p.add_argument("texts", nargs="*", help="texts to embed")
            p.add_argument("--file", help="one text per line")
            p.add_argument("--out", help="write embeddings as .npy")
        elif name == "index":
            p.add_argument("--corpus", required=True, help="JSONL of {pid, text}")
            p.add_argument("--out", required=True, help="index folder to write (FAISS index + passage ids and texts)")
            _index_flags(p, build=True)
            _executor_flags(p)
        else:
            p.add_argument("--index", required=True, help="index folder written by `drscaling index`")
            p.add_argument("-k", type=int, default=10, help="passages to return (default: %(default)s)")
            p.add_argument("query", help="the query text")
            _index_flags(p, build=False)


def _measure_parser(cmd: Register) -> None:
    p = cmd("measure", cmd_measure, "load-test served encoders on Triton and fit $ per token (and $ per step) against N; "
            "query towers: latency at batch 1 (concurrency 1 and 8), passage towers: throughput at batch 32")
    p.add_argument("--repo", default=f"{A}/serving/repo", help="start Triton on this repository")
    p.add_argument("--url", help="measure an already running server instead")
    p.add_argument("--train-experiment", default="sweeps", help="MLflow experiment holding the training runs")
    params_flag(p, "--preset", "sweep.preset", "training cost from this sweep preset's runs")
    params_flag(p, "--out", "budget.costs_path", "costs JSON; load.json and cost_vs_n.png go beside it", COSTS,
                "the versioned costs the budget reads")
    params_flag(p, "--repeats", "measure.repeats", "measure each load setting this often; the costs use the median",
                3, type=int)


def register(cmd: Register) -> None:
    _export_serve_parsers(cmd)
    _client_parsers(cmd)
    _measure_parser(cmd)
