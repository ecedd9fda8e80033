"""The Triton model repository: one folder per model, its config.pbtxt rendered from serving/templates.

    <repo>/<name>/config.pbtxt          from serving/templates/config.pbtxt.in
    <repo>/<name>/1/model.onnx          the exported graph (any variant, renamed)
    <repo>/<name>/1/model.py            python flavour only: runs model.onnx with onnxruntime
    <repo>/<name>/1/tokenizer/          for clients: they tokenise, the server sees token ids
    <repo>/<name>/1/drscaling.json      the model's metadata (shape, N, max lengths)

and, for text in (`text_ensemble`, on by default), two more models around the tensor model <name>:
    <repo>/<name>-tokenizer/            python model: BYTES texts -> input_ids, attention_mask
                                        (1/model.py from serving/templates/tokenizer.py, 1/tokenizer.json,
                                        1/python-env/bin/activate: see serving.stub_env)
    <repo>/<name>-text/                 ensemble: <name>-tokenizer then <name>; texts in, embeddings out

Every config carries the parameter `interface` ("tensor", "tokenizer", "text"), so clients and the
cost measurement tell the three apart.
"""

from __future__ import annotations

import json
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path
from drscaling.params import REPO

TEMPLATES = REPO / "serving" / "templates"
FLAVOURS = ("python", "onnxruntime")
KINDS = ("KIND_CPU", "KIND_GPU")
VERSION = "1"
TOWER_ROLES = ("shared", "query", "passage")
ONNX_FILES = {"fp32": "model.onnx", "opt": "model.opt.onnx", "fp16": "model.fp16.onnx",
              "int8": "model.int8.onnx"}
INTERFACES = ("tensor", "tokenizer", "text")
TEXT_SUFFIX = "-text"
TOKENIZER_SUFFIX = "-tokenizer"




@dataclass
class RepositoryConfig:
    flavour: str = "python"
    max_batch_size: int = 64
    dynamic_batching: bool = True
    # 100 us: long enough for concurrent batch-1 requests to meet, short enough to be invisible
    # next to a ~1 ms CPU inference.
    max_queue_delay_us: int = 100
    instances: int = 1
    kind: str = "KIND_CPU"
    variant: str = "fp32"
    intra_op_threads: int = 0  # python flavour: onnxruntime threads per instance (0 = all cores)
    # <name>-text beside <name>: the tokenizer runs in Triton (a python model; in the NGC container
    # it needs `pip install tokenizers`, else set this false)
    text_ensemble: bool = True

    def validate(self) -> None:
        if self.flavour not in FLAVOURS:
            raise DrscalingError(f"flavour must be one of {FLAVOURS} (got '{self.flavour}')")
        if self.kind not in KINDS:
            raise DrscalingError(f"kind must be one of {KINDS} (got '{self.kind}')")
        if self.variant not in ONNX_FILES:
            raise DrscalingError(f"variant must be one of {list(ONNX_FILES)} (got '{self.variant}')")
        for name in ("max_batch_size", "instances"):
            if getattr(self, name) < 1:
                raise DrscalingError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_queue_delay_us < 0:
            raise DrscalingError("max_queue_delay_us must be >= 0")


def build_model_repository(
    onnx_dir: str | Path, repo_dir: str | Path, name: str, flavour: str = "python",
    max_batch_size: int = 64, dynamic_batching: bool = True, max_queue_delay_us: int = 100,
    instances: int = 1, kind: str = "KIND_CPU", variant: str = "fp32", intra_op_threads: int = 0,
    text_ensemble: bool = True, tower: str = "shared", retriever: str | None = None,
) -> Path:
    """Write repo_dir/<name>/ (config.pbtxt + version 1) from an export folder; returns its path.

    With `text_ensemble`, also <name>-tokenizer and the ensemble <name>-text (see the module's
    docstring). Other models already in repo_dir are left alone; each model folder is replaced
    atomically as a whole, and every config is rendered before any folder is written.
    `tower` / `retriever` label one tower of a dual pair (build_tower_repository sets them).
    """
    from drscaling.model.saved import META_FILE, is_dual
    from drscaling.model.tokenizer import load_tokenizer

    cfg = RepositoryConfig(flavour, max_batch_size, dynamic_batching, max_queue_delay_us,
                           instances, kind, variant, intra_op_threads, text_ensemble)
    cfg.validate()
    if tower not in TOWER_ROLES:
        raise DrscalingError(f"tower must be one of {TOWER_ROLES} (got '{tower}')")
    _check_name(name)
    onnx_dir = Path(onnx_dir)
    if is_dual(onnx_dir):
        raise DrscalingError(
            f"{onnx_dir} holds dual towers (query/ and passage/): build it with build_tower_repository"
        )
    meta = _check_export(onnx_dir, cfg.variant)
    tokenizer = load_tokenizer(onnx_dir / "tokenizer")
    params = {
        "interface": "tensor",
        "onnx_file": "model.onnx",
        "variant": cfg.variant,
        "max_sequence_length": str(meta.get("max_positions", 512)),
        "max_query_len": str(meta.get("max_query_len", 32)),
        "max_passage_len": str(meta.get("max_passage_len", 180)),
        "vocab_size": str(len(tokenizer)),
        "pad_token_id": str(tokenizer.pad_token_id or 0),
        "shape": str(meta.get("shape", "")),
        "n_non_embedding": str(meta.get("n_non_embedding", 0)),
        "intra_op_threads": str(cfg.intra_op_threads),
        "tower": tower,
        "retriever": retriever or name,
    }
    text = render_config(name, cfg, int(meta["dim"]), params)
    text_models = _render_text_models(name, cfg, int(meta["dim"]), params, tokenizer) \
        if cfg.text_ensemble else {}
    repo_dir = Path(repo_dir)
    with atomic_path(repo_dir / name) as tmp:
        version = tmp / VERSION
        version.mkdir(parents=True)
        (tmp / "config.pbtxt").write_text(text)
        shutil.copy2(onnx_dir / ONNX_FILES[cfg.variant], version / "model.onnx")
        if cfg.flavour == "python":
            shutil.copy2(TEMPLATES / "model.py", version / "model.py")
        shutil.copytree(onnx_dir / "tokenizer", version / "tokenizer")
        shutil.copy2(onnx_dir / META_FILE, version / META_FILE)
    for model, files in text_models.items():
        with atomic_path(repo_dir / model) as tmp:
            (tmp / VERSION).mkdir(parents=True)
            for rel, content in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(content)
    return repo_dir / name


def _render_text_models(name: str, cfg: RepositoryConfig, dim: int, params: dict[str, str],
                        tokenizer) -> dict[str, dict[str, str]]:
    """{model name: {path in its folder: content}} for <name>-tokenizer and <name>-text.

    The tokenizer model gets the `tokenizers` object inside the client's transformers tokenizer
    (its backend_tokenizer, serialised), plus the padding and truncation settings transformers
    applies on each call, so server-side ids equal client-side ids.
    """
    tok_name, text_name = name + TOKENIZER_SUFFIX, name + TEXT_SUFFIX
    backend = tokenizer.backend_tokenizer
    tok_params = {
        "interface": "tokenizer",
        "encoder": name,
        "max_length": str(min(int(params["max_passage_len"]), int(params["max_sequence_length"]))),
        "max_sequence_length": params["max_sequence_length"],
        "pad_token_id": params["pad_token_id"],
        "pad_token": str(tokenizer.pad_token),
        "pad_token_type_id": str(tokenizer.pad_token_type_id),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }
    if cfg.flavour == "python":  # our server; the NGC container's stub reads strings with its own numpy
        from drscaling.serving.stub_env import EXECUTION_ENV_PATH, check_stub_env

        check_stub_env()  # fail now, not when the server starts
        tok_params["EXECUTION_ENV_PATH"] = EXECUTION_ENV_PATH  # relative: the repository can move
    tok_config = string.Template((TEMPLATES / "tokenizer.pbtxt.in").read_text()).substitute(
        name=tok_name, encoder=name, max_batch_size=cfg.max_batch_size, instances=cfg.instances,
        parameters=_render_parameters(tok_params),
    )
    ens_config = string.Template((TEMPLATES / "ensemble.pbtxt.in").read_text()).substitute(
        name=text_name, tokenizer=tok_name, encoder=name, max_batch_size=cfg.max_batch_size,
        dim=dim, parameters=_render_parameters(params | {"interface": "text", "encoder": name}),
    )
    files = {"config.pbtxt": tok_config, f"{VERSION}/tokenizer.json": backend.to_str(),
             f"{VERSION}/model.py": (TEMPLATES / "tokenizer.py").read_text()}
    if "EXECUTION_ENV_PATH" in tok_params:
        from drscaling.serving.stub_env import SHIM_DIR, activate_shim

        files[f"{VERSION}/{SHIM_DIR}/bin/activate"] = activate_shim()
    return {
        tok_name: files,
        text_name: {"config.pbtxt": ens_config},
    }


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise DrscalingError(f"model name '{name}' must be non-empty letters, digits, - _ .")


def _check_export(onnx_dir: Path, variant: str) -> dict:
    """An export folder's metadata, after checking it holds the graph of `variant` and a tokenizer."""
    onnx_file = onnx_dir / ONNX_FILES[variant]
    if not onnx_file.exists():
        raise DrscalingError(f"{onnx_file} not found: export the model first (variant '{variant}')")
    from drscaling.model.saved import META_FILE  # torch is loaded by now: the repository reads the model

    meta_file = onnx_dir / META_FILE
    if not meta_file.exists() or not (onnx_dir / "tokenizer").is_dir():
        raise DrscalingError(f"{onnx_dir} is not an export folder (no drscaling.json / tokenizer/)")
    return json.loads(meta_file.read_text())


def build_tower_repository(onnx_dir: str | Path, repo_dir: str | Path, name: str, **config) -> dict[str, Path]:
    """A dual export folder -> two models, repo_dir/<name>-query and repo_dir/<name>-passage.

    `config` takes build_model_repository's keywords (flavour, variant, max_batch_size, ...). Both
    towers are checked (export present, one embedding dimension) before either is written, so a bad
    pair leaves the repository as it was. Returns {"query": path, "passage": path}.
    """
    from drscaling.export import SIDES, tower_dim
    from drscaling.model.saved import is_dual

    onnx_dir = Path(onnx_dir)
    if not is_dual(onnx_dir):
        raise DrscalingError(
            f"{onnx_dir} is not a dual-tower export (no towers.json): export a dual model with "
            "`drscaling export --model <dual model folder>` first"
        )
    _check_name(name)
    tower_dim(onnx_dir)
    for side in SIDES:
        _check_export(onnx_dir / side, config.get("variant", "fp32"))
    return {side: build_model_repository(onnx_dir / side, repo_dir, f"{name}-{side}", tower=side,
                                         retriever=name, **config)
            for side in SIDES}


def render_config(name: str, cfg: RepositoryConfig, dim: int, params: dict[str, str]) -> str:
    template = string.Template((TEMPLATES / "config.pbtxt.in").read_text())
    engine = 'backend: "python"' if cfg.flavour == "python" else 'platform: "onnxruntime_onnx"'
    batching = (
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}"
        if cfg.dynamic_batching else ""
    )
    parameters = _render_parameters(params)
    return template.substitute(
        name=name, flavour=cfg.flavour, engine=engine, max_batch_size=cfg.max_batch_size, dim=dim,
        dynamic_batching=batching, instances=cfg.instances, kind=cfg.kind, parameters=parameters,
    )



def _render_parameters(params: dict[str, str]) -> str:
    """config.pbtxt `parameters` entries; values are escaped (a tokenizer's pad token is free text)."""
    def quoted(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"')

    return ",\n".join(
        f'  {{\n    key: "{k}"\n    value: {{ string_value: "{quoted(v)}" }}\n  }}'
        for k, v in params.items()
    )
