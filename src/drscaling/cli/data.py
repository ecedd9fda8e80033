"""Data commands: data extract-debian / import, prepare, validate, tokenizer, annotate."""

from __future__ import annotations

import argparse
from pathlib import Path

from drscaling import params
from drscaling.cli.common import A, Register, param, params_flag, prepared, prepared_flag, verbose_flag
from drscaling.errors import DrscalingError

FORMATS = ["msmarco", "pairs", "beir", "ir_datasets"]


def cmd_extract_debian(args) -> None:
    from drscaling.debian import extract

    n = extract(args.dest, args.lists_dir, fetch=not args.no_fetch)
    print(f"wrote {n} pairs to {args.dest}")


def cmd_import(args) -> None:
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
        from drscaling.dataset.msmarco import import_msmarco

        report = import_msmarco(args.src, args.dest)
    elif args.format == "pairs":
        from drscaling.dataset.pairs import import_pairs

        report = import_pairs(args.src, args.dest, sizes["dev_size"], sizes["test_size"], sizes["seed"],
                                   sizes["defaults"])
    elif args.format == "beir":
        from drscaling.dataset.beir import import_beir

        report = import_beir(args.src, args.dest, mapping=mapping, **sizes)
    else:
        from drscaling.dataset.irds import import_ir_datasets

        report = import_ir_datasets(args.src, args.dest, mapping=mapping, **sizes)
    print(report.message())


def cmd_prepare(args) -> None:
    from drscaling.dataset.snapshot import prepare_debian

    d = params.section("data")
    counts = prepare_debian(param(args, "raw", "data", "data/debian/pairs.jsonl"), prepared(args),
                            d.get("dev_size", 1000), d.get("test_size", 1000), d.get("seed", 13))
    print("prepared: " + ", ".join(f"{k}={v} pairs" for k, v in counts.items()))


def cmd_validate(args) -> None:
    from drscaling.validate import Bounds, validate_dataset

    bounds = params.build(Bounds, params.section("validate"))
    summary = validate_dataset(prepared(args), args.report, bounds)
    print(f"validation passed: {sum(summary['rows'].values())} rows in {len(summary['rows'])} files; report {args.report}")


def cmd_tokenizer(args) -> None:
    from drscaling.data import load_split
    from drscaling.model.tokenizer import train_tokenizer

    train = load_split(prepared(args), "train")
    vocab = args.vocab_size or params.section("tokenizer").get("vocab_size", 16384)
    tok = train_tokenizer(list(train.corpus["text"]) + list(train.queries["text"]), vocab, args.out)
    print(f"WordPiece vocabulary of {len(tok)} tokens in {args.out}")


def cmd_annotate(args) -> None:
    from drscaling.annotate import annotate

    out = Path(args.out or f"{A}/annotations/{args.source}.jsonl")
    # an --out elsewhere keeps its GX report beside it: the pipeline's own report is a DVC output
    report = Path(f"{A}/validation/annotations-{args.source}.json") if args.out is None else None
    generation = {"limit": args.limit, "endpoint": args.endpoint, "model": args.model,
                  "request_timeout_s": args.timeout, "request_attempts": args.attempts,
                  "restart": True if args.restart else None}
    cost = annotate(args.source, prepared(args), out, report, args.regenerate, generation)
    print(f"{args.source}: {cost['pairs']} pairs in {out} (validated; ${cost['usd_per_pair']:.3g}/pair)")


# ---------------------------------------------------------------------------------------------
# parsers
# ---------------------------------------------------------------------------------------------


def _data_parsers(cmd: Register) -> None:
    data = cmd("data", None, "dataset tools: rebuild the Debian snapshot, import MS MARCO or pairs")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("extract-debian", help="rebuild data/debian/pairs.jsonl from the Debian archive (needs apt access)")
    p.add_argument("--dest", default="data/debian/pairs.jsonl", help="pairs file to write (default: %(default)s)")
    p.add_argument("--lists-dir", default=f"{A}/apt-lists", help="private apt lists folder")
    p.add_argument("--no-fetch", action="store_true", help="use lists already in --lists-dir")
    p.set_defaults(func=cmd_extract_debian)
    verbose_flag(p)
    p = dsub.add_parser("import", help="import a dataset into the canonical format",
                        description="Import a dataset into the canonical format (train/dev/test). The dataset "
                                    "is written to a temporary folder and renamed onto DEST at the end: on any "
                                    "error DEST is left as it was. Dropped rows are counted in the report.")
    p.add_argument("--format", choices=FORMATS, required=True, help="the layout of SRC (see SRC)")
    p.add_argument("src", help="msmarco: folder of collection/queries/qrels TSVs; pairs: JSONL of {query, passage}; "
                               "beir: folder of corpus.jsonl, queries.jsonl, qrels/<split>.tsv; "
                               "ir_datasets: a dataset id such as msmarco-passage/train or beir/scifact "
                               "(needs `pip install ir-datasets`, and network to download)")
    p.add_argument("dest", help="output dataset folder (train/dev/test); an existing dataset there is replaced")
    params_flag(p, "--dev-size", "data.dev_size", "pairs: dev pairs, counted after de-duplication; beir/ir_datasets: "
                "pairs carved for dev when it shares its source with another split", 1000,
                "scaled down when the data is small", type=int)
    params_flag(p, "--test-size", "data.test_size", "as --dev-size, for test", 1000, "scaled down when the data is small",
                type=int)
    p.add_argument("--split", action="append", metavar="NAME=SOURCE",
                   help="beir/ir_datasets: where split NAME (train, dev, test) comes from: a qrels/<SOURCE>.tsv "
                        "file or an ir_datasets (sub-)id; splits naming the same source are carved out of it by "
                        "query group, e.g. --split dev=train. Default: each split from its own name")
    params_flag(p, "--seed", "data.seed", "seed of the carving", 13, type=int)
    p.set_defaults(func=cmd_import)
    verbose_flag(p)


def _annotate_parser(p: argparse.ArgumentParser) -> None:
    from drscaling.annotation import sources
    from drscaling.annotation.bounds import REQUEST_ATTEMPTS, REQUEST_TIMEOUT_S, request_bound_s

    listed = "; ".join(f"{s.name}: {s.summary} (cost: {s.pricing})" for s in sources.REGISTRY.values())
    p.add_argument("--source", required=True, choices=sources.names(), help=listed)
    prepared_flag(p)
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


def register(cmd: Register) -> None:
    _data_parsers(cmd)
    p = cmd("prepare", cmd_prepare, "split the Debian snapshot into canonical train/dev/test")
    params_flag(p, "--raw", "data.raw", "the Debian pairs snapshot (JSONL of {query, passage})", "data/debian/pairs.jsonl")
    prepared_flag(p, "output dataset folder (train/dev/test)")
    p = cmd("validate", cmd_validate, "Great Expectations gate over every split")
    prepared_flag(p)
    p.add_argument("--report", default=f"{A}/validation/dataset.json", help="validation report JSON (default: %(default)s)")
    p = cmd("tokenizer", cmd_tokenizer, "train the shared WordPiece vocabulary on the train split")
    prepared_flag(p)
    params_flag(p, "--vocab-size", "tokenizer.vocab_size", "WordPiece vocabulary size", 16384, type=int)
    p.add_argument("--out", default=f"{A}/tokenizer", help="tokenizer folder to write (default: %(default)s)")
    _annotate_parser(cmd("annotate", cmd_annotate, "produce, validate and publish training pairs from one annotation source"))
