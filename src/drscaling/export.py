"""Export a trained encoder to ONNX (one graph: token ids -> pooled, projected embedding).

Output folder (what `serving.build_model_repository` reads):
    model.onnx          fp32 graph, inputs input_ids / attention_mask (int64 [batch, seq]),
                        output embedding (float32 [batch, dim])
    model.opt.onnx      optional: onnxruntime transformer optimiser (fused attention/LayerNorm/GELU)
    model.fp16.onnx     optional: optimised graph in fp16 with fp32 inputs/outputs (for GPUs)
    model.int8.onnx     optional: dynamic int8 quantisation of the graph (for CPUs)
    tokenizer/          the model's tokenizer (clients tokenise; the server sees only ids)
    drscaling.json      the model's ModelMeta (shape, N, max lengths)
    export.json         opset, variants and their measured parity against PyTorch

A dual-tower model (ScalingNote: `query/` + `passage/` + `towers.json`, see drscaling.model) exports to
the same layout one level down, each tower with its own parity check:
    query/              an export folder as above, of the query tower
    passage/            an export folder as above, of the passage tower
    towers.json         {"source", "dim", "towers": {"query": <export.json>, "passage": <export.json>}}
                        (+ "quality" after quality_delta)
Both towers must embed in one dimension (scores are <f_q(q), f_p(p)>): a mismatch is refused before
anything is exported.

The legacy TorchScript exporter is used (not dynamo): it needs no onnxscript at run time and its
graphs ran 5-18% faster in onnxruntime on CPU here. It chokes on BertModel's `use_cache` keyword,
so a small wrapper with exactly `forward(input_ids, attention_mask)` is exported instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, dumps, read_json, write_json
from drscaling.model.retriever import SIDES
from drscaling.model.saved import META_FILE, TOWERS_FILE  # a dual export folder carries the dual model's marker

VARIANTS = ("fp32", "opt", "fp16", "int8")
VARIANT_FILES = {
    "fp32": "model.onnx",
    "opt": "model.opt.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",
}
# fp32 graphs must match PyTorch this closely or the export is refused. fp16 / int8 are lossy by
# design: their parity is measured and recorded, and only a gross mismatch (a broken graph) fails.
FP32_TOL = 1e-4
LOSSY_MIN_COSINE = 0.95  # below this a lossy variant is flagged in export.json (its CE change says how much it costs)
BROKEN_MIN_COSINE = 0.5  # below this (or non-finite) the graph is broken, not just lossy: refuse it
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "embedding"

# A handful of real sentences of different lengths: parity is checked on real token patterns
# (padding included), not only on random ids.
PARITY_TEXTS = [
    "what is rsync",
    "Real-time strategy game of ancient warfare",
    "fast, versatile, remote (and local) file-copying tool that uses a delta-transfer algorithm",
    "GNU C compiler",
    "The quick brown fox jumps over the lazy dog while the compiler links the shared library "
    "against the system's Python interpreter and reports every unresolved symbol.",
    "a",
]


@dataclass
class ExportConfig:
    opset: int = 17
    variants: tuple[str, ...] = ("fp32",)
    parity_max_len: int = 64


class _Wrapper(nn.Module):
    """Exactly (input_ids, attention_mask) -> embedding, so the legacy exporter sees no kwargs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# Model input: a folder, an MLflow run or a registered model (registry.local_model, the one resolver)
# ---------------------------------------------------------------------------------------------


def resolve_model_dir(model: str | Path):
    """A model folder as is, or `runs:/...`, a run id or `models:/name@alias` downloaded (registry.local_model)."""
    from drscaling.registry import local_model

    return local_model(model)


# ---------------------------------------------------------------------------------------------
# onnxruntime helpers
# ---------------------------------------------------------------------------------------------


def ort_session(path: str | Path, threads: int = 0, providers: Sequence[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
    avail = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def ort_encode_fn(session, tokenizer, batch_size: int = 128) -> Callable[[list[str], int], np.ndarray]:
    """An `encode(texts, max_len) -> float32 [n, dim]` backed by an onnxruntime session."""

    def encode(texts: list[str], max_len: int) -> np.ndarray:
        order = np.argsort([len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            feeds = token_feeds(tokenizer, [texts[i] for i in idx], max_len)
            emb = session.run([OUTPUT_NAME], feeds)[0].astype(np.float32)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    return encode


def torch_encode_fn(encoder: nn.Module, tokenizer, batch_size: int = 128):
    from drscaling.model.retriever import encode

    def fn(texts: list[str], max_len: int) -> np.ndarray:
        return encode(encoder, tokenizer, texts, max_len, batch_size=batch_size)

    return fn


def token_feeds(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """The encoder's inputs for a batch: truncated to max_len, padded to the batch's longest (the one
    tokenisation of every client: Triton's, onnxruntime's, a Ray index actor's)."""
    enc = tokenizer(
        texts, max_length=max_len, truncation=True, padding=True, return_tensors="np",
        return_token_type_ids=False,
    )
    return {k: enc[k].astype(np.int64) for k in INPUT_NAMES}


def parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    ref_n = reference / np.maximum(np.linalg.norm(reference, axis=1, keepdims=True), 1e-12)
    oth_n = other / np.maximum(np.linalg.norm(other, axis=1, keepdims=True), 1e-12)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "min_cosine": float((ref_n * oth_n).sum(1).min()) if diff.size else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_onnx(
    model_dir: str | Path, out_dir: str | Path, opset: int = 17,
    variants: Sequence[str] = ("fp32",), parity_max_len: int = 64,
) -> dict:
    """Export `model_dir` (folder or MLflow run) to `out_dir`; returns the export.json record.

    Every variant's parity with PyTorch is measured on real texts; fp32 and "opt" must match within
    1e-4 (max abs diff) or a DrscalingError is raised and nothing is written. When an MLflow run is
    active, the parity numbers and export.json are logged to it. A dual-tower model exports each
    tower to `out_dir/query` and `out_dir/passage` and returns the towers.json record.
    """
    cfg = ExportConfig(opset=opset, variants=tuple(variants), parity_max_len=parity_max_len)
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise DrscalingError(f"unknown ONNX variant(s) {unknown}; choose from {list(VARIANTS)}")
    if not 14 <= cfg.opset <= 20:
        # 14 is the lowest opset with the ops BERT needs in one piece; ORT 1.31 supports up to 20+.
        raise DrscalingError(f"opset must be between 14 and 20 (got {cfg.opset})")
    from drscaling.model.saved import is_dual

    with resolve_model_dir(model_dir) as src:
        if is_dual(src):
            return _export_towers(src, Path(out_dir), cfg, str(model_dir))
        record = _export_tower(src, Path(out_dir), cfg, str(model_dir))
    _log_to_mlflow(record, Path(out_dir) / "export.json")
    return record


def tower_dim(folder: str | Path) -> int:
    """The one embedding dimension of a dual-tower folder (model or export; read from each tower's
    drscaling.json, before any weights load); a DrscalingError when the towers disagree."""
    folder = Path(folder)
    dims = {}
    for side in SIDES:
        meta = folder / side / META_FILE
        if not meta.exists():
            raise DrscalingError(f"{folder} is a dual-tower folder without {side}/drscaling.json")
        dims[side] = int(read_json(meta, what=f"{side} tower metadata")["dim"])
    if dims["query"] != dims["passage"]:
        raise DrscalingError(
            f"{folder}: the query tower embeds in {dims['query']} dimensions but the passage tower in "
            f"{dims['passage']}; scores are inner products, so both towers need one dimension "
            "(retrain or re-distil one tower with the other's dim)"
        )
    return dims["query"]


def _export_towers(src: Path, out_dir: Path, cfg: ExportConfig, source: str) -> dict:
    dim = tower_dim(src)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        towers = {side: _export_tower(src / side, tmp / side, cfg, f"{source}/{side}") for side in SIDES}
        record = {"source": source, "dim": dim, "towers": towers}
        write_json(tmp / TOWERS_FILE, without_timings(record))
    for side in SIDES:
        _log_to_mlflow(towers[side], out_dir / side / "export.json", prefix=f"{side}_")
    return record


def _export_tower(src: Path, out_dir: Path, cfg: ExportConfig, source: str) -> dict:
    """One encoder (a shared model or one tower) -> out_dir, with every variant's parity."""
    from drscaling.model.saved import load_model

    encoder, tokenizer, meta = load_model(src)
    max_len = min(cfg.parity_max_len, meta.max_positions)
    reference = torch_encode_fn(encoder, tokenizer)(PARITY_TEXTS, max_len)
    record: dict = {
        "source": source, "shape": meta.shape, "n_non_embedding": meta.n_non_embedding,
        "dim": meta.dim, "max_positions": meta.max_positions, "opset": cfg.opset,
        "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME, "variants": {},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        _export_fp32(encoder, tokenizer, tmp / VARIANT_FILES["fp32"], cfg.opset)
        record["export_seconds"] = round(time.perf_counter() - t0, 2)
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / META_FILE).write_text(dumps(dataclasses.asdict(meta), indent=2))
        for variant in ("fp32", *[v for v in VARIANTS if v in cfg.variants and v != "fp32"]):
            path = tmp / VARIANT_FILES[variant]
            if variant != "fp32":
                _make_variant(variant, tmp)
            record["variants"][variant] = _check_variant(
                variant, path, tokenizer, reference, max_len
            )
        write_json(tmp / "export.json", without_timings(record))
    return record


def without_timings(record: dict) -> dict:
    """export.json as DVC caches it: a pure function of the model (timings go to MLflow only), so a
    rerun of the export stage on the same models leaves dvc.lock as it was."""
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in record.items() if not k.endswith("_seconds")}


def _export_fp32(encoder: nn.Module, tokenizer, path: Path, opset: int) -> None:
    # Eager attention (explicit MatMul/Softmax) instead of SDPA: numerically the same, but the
    # SDPA trace carries IsNaN/Where mask guards that stop onnxruntime's optimiser from fusing
    # attention, and the eager graph ran ~20% faster in onnxruntime on CPU here.
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and hasattr(backbone, "set_attn_implementation"):
        with contextlib.suppress(ValueError, ImportError):
            backbone.set_attn_implementation("eager")
    wrapper = _Wrapper(encoder)
    wrapper.eval()  # export restores the wrapper's flag onto the whole model: it must be eval
    enc = token_feeds(tokenizer, PARITY_TEXTS[:2], 16)
    args = tuple(torch.from_numpy(enc[k]) for k in INPUT_NAMES)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            OUTPUT_NAME: {0: "batch"}}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings about HF's Python-side mask checks: the traced branches are the
            # ones every padded batch takes, and parity below proves the graph right.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
    except Exception as exc:
        raise DrscalingError(f"ONNX export failed ({type(exc).__name__}: {exc})") from exc


def _make_variant(variant: str, folder: Path) -> None:
    fp32 = folder / VARIANT_FILES["fp32"]
    if variant in ("opt", "fp16"):
        opt = _optimize(fp32)
        if variant == "fp16":
            # keep_io_types: clients still send int64 ids and receive float32 embeddings, so the
            # Triton config and client code are the same for every variant.
            opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(folder / VARIANT_FILES[variant]))
    elif variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Quantise the optimised graph when it exists: fused MatMuls quantise better and faster.
        src = folder / VARIANT_FILES["opt"]
        if not src.exists():
            src = fp32
        import onnx

        # Fused ops (com.microsoft domain) defeat ORT's shape inference; the default type tells the
        # quantiser their outputs are float32 (they are).
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its "consider pre-processing" hint is for static quantisation
        try:
            quantize_dynamic(
                str(src), str(folder / VARIANT_FILES["int8"]), weight_type=QuantType.QInt8,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            root.setLevel(level)


def _optimize(path: Path):
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = _heads_hidden(path)
    # opt_level=1 plus the Python fusions: portable between CPU and GPU (level 2+ bakes in
    # provider-specific kernels).
    return optimize_model(
        str(path), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1,
    )


def _heads_hidden(path: Path) -> tuple[int, int]:
    """Read hidden size / heads from the backbone config saved next to the graph (0 = let ORT guess)."""
    meta_file = path.parent / META_FILE
    shape = json.loads(meta_file.read_text()).get("shape", "") if meta_file.exists() else ""
    m = re.match(r"^bert-L(\d+)-H(\d+)$", shape)
    if m:
        hidden = int(m.group(2))
        return hidden // 64, hidden
    return 0, 0


def _check_variant(
    variant: str, path: Path, tokenizer, reference: np.ndarray, max_len: int
) -> dict:
    try:
        session = ort_session(path)
    except Exception as exc:
        if variant == "fp16":
            # Some fp16 kernels exist only on GPU: record why parity is missing instead of failing.
            return {"file": path.name, "parity": None, "note": f"not runnable here: {exc}"[:300]}
        raise DrscalingError(f"onnxruntime cannot load {path.name}: {exc}") from exc
    t0 = time.perf_counter()
    got = ort_encode_fn(session, tokenizer)(PARITY_TEXTS, max_len)
    p = parity(reference, got)
    entry = {"file": path.name, "parity": p, "providers": session.get_providers(),
             "parity_seconds": round(time.perf_counter() - t0, 4),
             "size_bytes": path.stat().st_size}
    if variant in ("fp32", "opt") and not p["max_abs_diff"] <= FP32_TOL:
        raise DrscalingError(
            f"ONNX {variant} graph differs from PyTorch: max abs diff {p['max_abs_diff']:.3g} > "
            f"{FP32_TOL} on {len(PARITY_TEXTS)} texts; the export is not trustworthy"
        )
    if variant in ("fp16", "int8") and not p["min_cosine"] >= BROKEN_MIN_COSINE:
        raise DrscalingError(
            f"ONNX {variant} graph is broken: min cosine to PyTorch {p['min_cosine']:.3f} < "
            f"{BROKEN_MIN_COSINE}"
        )
    if variant in ("fp16", "int8") and p["min_cosine"] < LOSSY_MIN_COSINE:
        entry["warning"] = (f"{variant} is lossy on this model: min cosine to PyTorch {p['min_cosine']:.3f}"
                            f" < {LOSSY_MIN_COSINE}; see its change in contrastive entropy before serving it")
        print(f"warning: {entry['warning']}")
    return entry


def _log_to_mlflow(record: dict, export_json: Path, prefix: str = "") -> None:
    """Log parity to the active MLflow run, if any (export never starts a run of its own).
    `prefix` ("query_" / "passage_") keeps the two towers' numbers apart in one run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_params({"onnx_opset": record["opset"],
                       "onnx_variants": ",".join(record["variants"])})
    if prefix:
        mlflow.log_params({f"{prefix}shape": record["shape"],
                           f"{prefix}n_non_embedding": record["n_non_embedding"]})
    mlflow.log_metrics({f"{prefix}onnx_export_seconds": record["export_seconds"]} if "export_seconds" in record else {})
    for variant, entry in record["variants"].items():
        if "parity_seconds" in entry:
            mlflow.log_metric(f"{prefix}onnx_{variant}_parity_seconds", entry["parity_seconds"])
        if entry.get("parity"):
            mlflow.log_metrics({
                f"{prefix}onnx_{variant}_max_abs_diff": entry["parity"]["max_abs_diff"],
                f"{prefix}onnx_{variant}_min_cosine": entry["parity"]["min_cosine"],
            })
    mlflow.log_artifact(str(export_json), artifact_path="onnx" + (f"/{prefix.rstrip('_')}" if prefix else ""))
    # the fp32 graph as an MLflow Model (onnx flavour): runs:/<id>/onnx (onnx-query, onnx-passage for towers)
    from drscaling.registry import log_onnx

    log_onnx(export_json.parent / VARIANT_FILES["fp32"], "onnx" + (f"-{prefix.rstrip('_')}" if prefix else ""),
             int(record["dim"]))


# ---------------------------------------------------------------------------------------------
# Quality change of each variant
# ---------------------------------------------------------------------------------------------


def quality_delta(
    onnx_dir: str | Path, metric: Callable[..., float],
    model_dir: str | Path | None = None, variants: Sequence[str] | None = None,
    write: bool = True,
) -> dict:
    """Measure `metric` for every exported variant (and PyTorch when `model_dir` is given).

    `metric(encode)` receives `encode(texts, max_len) -> float32 [n, dim]` and returns a number
    (e.g. contrastive entropy on a dev set); for a dual-tower export it is called as
    `metric(query_encode, passage_encode)`, both towers in the same variant. Returns {"torch": v,
    "variants": {name: {"value", "delta"}}} where delta is against PyTorch when given, else against
    fp32 ONNX. The result is merged into export.json (towers.json) under "quality" and logged to
    the active MLflow run, if any.
    """
    from drscaling.model.saved import is_dual, load_retriever
    from drscaling.model.tokenizer import load_tokenizer

    onnx_dir = Path(onnx_dir)
    dual = is_dual(onnx_dir)
    record_path = onnx_dir / (TOWERS_FILE if dual else "export.json")
    if not record_path.exists():
        raise DrscalingError(f"{onnx_dir} holds no export.json: run export first")
    record = json.loads(record_path.read_text())
    exported = record["towers"]["query"]["variants"] if dual else record["variants"]
    names = list(variants) if variants else list(exported)
    folders = [onnx_dir / side for side in SIDES] if dual else [onnx_dir]
    tokenizers = [load_tokenizer(f / "tokenizer") for f in folders]
    result: dict = {"torch": None, "variants": {}}
    if model_dir is not None:
        with resolve_model_dir(model_dir) as src:
            r = load_retriever(src)
            towers = (r.query, r.passage) if dual else (r.query,)
            result["torch"] = float(metric(*(torch_encode_fn(t.encoder, t.tokenizer) for t in towers)))
    for name in names:
        if name not in exported:
            raise DrscalingError(f"variant {name} was not exported to {onnx_dir}")
        try:
            sessions = [ort_session(f / VARIANT_FILES[name]) for f in folders]
        except Exception as exc:  # fp16 may not run on CPU: skip it, say why
            result["variants"][name] = {"value": None, "delta": None, "note": str(exc)[:300]}
            continue
        fns = [ort_encode_fn(sess, tok) for sess, tok in zip(sessions, tokenizers, strict=True)]
        result["variants"][name] = {"value": float(metric(*fns))}
    base = result["torch"]
    if base is None and (result["variants"].get("fp32") or {}).get("value") is not None:
        base = result["variants"]["fp32"]["value"]
    for entry in result["variants"].values():
        if entry.get("value") is not None:
            entry["delta"] = None if base is None else entry["value"] - base
    if write:
        record["quality"] = result
        write_json(record_path, record)
    _log_quality(result)
    return result


def _log_quality(result: dict) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    if result["torch"] is not None:
        mlflow.log_metric("quality_torch", result["torch"])
    for name, entry in result["variants"].items():
        if entry.get("value") is not None:
            mlflow.log_metric(f"quality_onnx_{name}", entry["value"])
        if entry.get("delta") is not None:
            mlflow.log_metric(f"quality_delta_onnx_{name}", entry["delta"])
