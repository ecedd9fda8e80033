"""Tokenizers: the lower-cased WordPiece vocabulary trained on the training corpus (BERT shapes built
from config), loading a saved one, tokenising a batch, and which tokenizer each shape trains and serves
with (a checkpoint's own, a decoder's ending every text with its end-of-text token).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path
from drscaling.model.shapes import LLMS, llm_folder, resolve, series_shape

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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
