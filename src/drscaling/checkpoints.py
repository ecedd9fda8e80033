"""Where each shape starts: `init` values and templates, resolved per shape before any compute.

`init` (TrainConfig.init, a preset's `train.init`, `drscaling train --init`) is one of:
    ""           the shape's default: BERT zoo shapes from config (with the shared trained vocabulary),
                 minilm-L{k} cut from all-MiniLM-L6-v2 (its wheel), smollm2-135m from the packaged GGUF;
    scratch      from config (BERT zoo shapes only);
    a value      a local folder, a hub id (org/name) or a packaged name (all-MiniLM-L6-v2);
    a template   the same with placeholders the shape fills in:
                   bert-L{L}-H{H}:   {L} layers, {H} hidden size, {A} heads (H/64), {shape}
                   smollm2-{size}:   {size} (135M, 360M, 1.7B), {L}, {H}, {A}, {shape}
                 e.g. google/bert_uncased_L-{L}_H-{H}_A-{A} or /models/bert_uncased_L-{L}_H-{H}_A-{A}.
                 minilm-L{k} shapes take no init (each is a cut of one packaged checkpoint).
A preset may map shape families to values instead (`init: {bert: ..., smollm2: ...}`): a sweep mixing
BERT miniatures and an LLM gives each family its own template; a family it does not name keeps "".

A hub id is looked up in the local Hugging Face cache and, when online (HF_HUB_OFFLINE=0), downloaded
into it first; offline, a hub id not in the cache is an error. A filled-in template whose checkpoint
does not exist, or whose config.json has other layers or width than the shape, is an error too.

A run records the checkpoint it started from (`Start.checkpoint`: the filled-in folder or hub id as the
user wrote it, or the packaged name, never a machine's cache path, so sweep results stay a pure function
of their inputs) and an md5 of its weight files (`Start.digest`).
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

from drscaling.errors import DrscalingError
from drscaling.model.shapes import LLMS, PACKAGED, SERIES, SERIES_RE, check_shape, parse_shape, resolve

SCRATCH = "scratch"
FAMILIES = ("bert", "minilm", "smollm2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# What a hub checkpoint needs to train and serve: config, tokenizer and PyTorch weights (the google
# BERT repos also hold TF and Flax weights, which are not fetched).
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]


@dataclass(frozen=True)
class Start:
    """A shape's resolved starting point."""

    shape: str
    init: str  # the config's value for this shape (template or plain; "" = the shape's default)
    checkpoint: str  # what it names: "scratch", the filled-in folder or hub id, or the packaged name
    load: str | None  # the local folder build_model loads; None: the shape's own route (config, packaged)
    digest: str  # md5 of the checkpoint's weight files; "" from config

    def record(self) -> dict[str, str]:
        """What a run logs (MLflow params) and a sweep row holds about where it started."""
        return {"init_checkpoint": self.checkpoint, "init_hash": self.digest}


def family(shape: str) -> str:
    if shape in LLMS:
        return shape.split("-")[0]
    return "minilm" if SERIES_RE.match(shape) else "bert"


def shape_fields(shape: str) -> dict[str, object]:
    """The placeholders a shape fills into an init template."""
    if shape in LLMS:
        llm = LLMS[shape]
        return {"shape": shape, "size": llm.size, "L": llm.layers, "H": llm.hidden, "A": llm.heads}
    if SERIES_RE.match(shape):
        return {}
    s = parse_shape(shape)
    return {"shape": shape, "L": s.layers, "H": s.hidden, "A": s.heads}


def fill(template: str, shape: str) -> str:
    """The template with the shape's placeholders filled in (a plain value comes back unchanged)."""
    fields = shape_fields(shape)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # an unmatched brace
        raise DrscalingError(f"init template '{template}': {exc}") from exc
    for name in names:
        if name not in fields:
            known = ", ".join("{" + k + "}" for k in fields) or "none"
            raise DrscalingError(
                f"init template '{template}': unknown placeholder {{{name}}} for shape {shape}"
                f" ({family(shape)} shapes have: {known})"
            )
    return template.format_map(fields)


def init_for(spec: str | dict | None, shape: str) -> str:
    """A shape's init from a plain value/template or a preset's mapping of families to values."""
    if spec is None:
        return ""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(FAMILIES))
        if unknown:
            raise DrscalingError(f"init: unknown shape famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)};"
                                 f" families: {', '.join(FAMILIES)}")
        spec = spec.get(family(shape)) or ""
    if not isinstance(spec, str):
        raise DrscalingError(f"init must be a string or a mapping of shape families to strings (got {spec!r})")
    return spec


def resolve_start(shape: str, init: str) -> Start:
    """Where `shape` starts under `init`; an error naming the path or hub id when it does not exist.
    Loads no model: only config.json is read and the weight files hashed."""
    check_shape(shape)
    init = init_for(init, shape)
    fam = family(shape)
    if init == "":
        return _default(shape, fam)
    if init == SCRATCH:
        if fam != "bert":
            raise DrscalingError(f"init 'scratch' builds BERT zoo shapes from config; {shape} starts from its checkpoint")
        return Start(shape, init, SCRATCH, None, "")
    if fam == "minilm":
        raise DrscalingError(f"shape {shape} is a cut of {SERIES[fam][0]} and takes no init (got '{init}')")
    name = fill(init, shape)
    where = f"shape {shape}: checkpoint {name}" + (f" (init template '{init}')" if name != init else "")
    folder = _locate(name, where)
    if name != init:
        _check_fits(folder, shape, where)
    return Start(shape, init, name, str(folder), weights_digest(folder, where))


def _default(shape: str, fam: str) -> Start:
    if fam == "bert":
        return Start(shape, "", SCRATCH, None, "")
    if fam == "minilm":
        checkpoint = SERIES[fam][0]
        return Start(shape, "", checkpoint, None, weights_digest(Path(resolve(checkpoint)), f"shape {shape}"))
    from drscaling.model.shapes import llm_folder
    from drscaling.weights import gguf_file

    packaged = LLMS[shape].packaged
    gguf = gguf_file(packaged) if packaged else None
    source = gguf or Path(llm_folder(shape))  # llm_folder raises for a shape with no offline weights
    return Start(shape, "", source.name, None, weights_digest(source, f"shape {shape}"))


def _locate(name: str, where: str) -> Path:
    """The local folder of a packaged name, a folder path, or a hub id (from the HF cache)."""
    if name in PACKAGED:
        return Path(resolve(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DrscalingError(f"{where}: {path} is not a model folder (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise DrscalingError(f"{where}: folder {path} does not exist")
    return hub_snapshot(name, where)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_snapshot(repo_id: str, where: str) -> Path:
    """The local snapshot folder of a hub checkpoint: from the cache, downloaded first when online.
    HF_HUB_OFFLINE and HF_HUB_CACHE are read now, not when huggingface_hub was imported."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    is_offline = offline()
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=is_offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        if is_offline:
            raise DrscalingError(
                f"{where}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it online"
                " first (HF_HUB_OFFLINE=0) or name a local folder"
            ) from exc
        raise DrscalingError(f"{where}: cannot fetch it from the hub ({type(exc).__name__}: {str(exc)[:300]})") from exc
    if not (Path(folder) / "config.json").is_file():
        raise DrscalingError(f"{where}: the cached snapshot {folder} has no config.json")
    return Path(folder)


def _check_fits(folder: Path, shape: str, where: str) -> None:
    """A template must give each shape its own checkpoint: layers and width as the shape says."""
    config = json.loads((folder / "config.json").read_text())
    fields = shape_fields(shape)
    got = (config.get("num_hidden_layers"), config.get("hidden_size"))
    if None not in got and got != (fields["L"], fields["H"]):
        raise DrscalingError(f"{where} has {got[0]} layers of width {got[1]}, not {fields['L']} of {fields['H']}"
                             " as the shape says: check the template")


_DIGESTS: dict[tuple, str] = {}


def weights_digest(path: Path, where: str) -> str:
    """md5 of a checkpoint's weight files (a folder's, or one file); computed once per process per
    unchanged set of files (a sweep resolves every point's start before training and again per run)."""
    from drscaling.tracking import file_version

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise DrscalingError(f"{where}: {path} holds no weights ({', '.join(WEIGHT_SUFFIXES)} files)")
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _DIGESTS:
        _DIGESTS[stamp] = file_version(path, suffixes=WEIGHT_SUFFIXES)
    return _DIGESTS[stamp]
