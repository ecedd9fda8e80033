"""Local generators: a transformers decoder or seq2seq model (GGUF or HF folder) run in-process."""

from __future__ import annotations

import copy
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drscaling.annotation.config import Completion, GenerationConfig
from drscaling.annotation.prompts import CHAT_PROMPTS, DEFAULT_MAX_NEW_TOKENS, PROMPTS, resolve_prompt
from drscaling.errors import DrscalingError
from drscaling.weights import ensure_local_model

PREFIX_CACHE_MIN_TOKENS = 32  # below this, re-running the shared prefix costs less than copying its cache


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DrscalingError(f"device {device!r} requested but no CUDA device is available")
    return device


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def load_model(model: str, device: str = "auto", cache_dir: str | Path | None = None):
    """(model, tokenizer, is_seq2seq, resolved name) for a spec; user errors as DrscalingError."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where = ensure_local_model(model, cache_dir)
    try:
        config = AutoConfig.from_pretrained(where)
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(where)
        net = cls.from_pretrained(where)
    except (OSError, ValueError) as exc:
        hint = " (offline: a hub name only loads when online or already in the HF cache)" if not Path(where).exists() else ""
        raise DrscalingError(f"cannot load model {model!r}{hint}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    net.to(resolve_device(device)).eval()
    return net, tokenizer, seq2seq, where


class LocalGenerator:
    """Batched generation with a transformers model. Decoders are left-padded so every prompt ends
    where generation starts; completion prompts stop at the first newline."""

    def __init__(self, model, tokenizer, seq2seq: bool, name: str, prompt_kind: str,
                 max_new_tokens: int, temperature: float, top_p: float):
        self.model, self.tokenizer, self.seq2seq = model, tokenizer, seq2seq
        self.name, self.prompt_kind = name, prompt_kind
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.device = device_name(str(next(model.parameters()).device))
        self.tokenizer.padding_side = "right" if seq2seq else "left"
        self._prefix: tuple[list[int], Any] | None = None  # (token ids, their KV cache)
        self._head: tuple[str, list[int]] | None = None  # (prompt kind, its template's ids before the passage)

    @classmethod
    def load(cls, model: str, source: str, cfg: GenerationConfig) -> LocalGenerator:
        net, tok, seq2seq, where = load_model(model, cfg.device, cfg.cache_dir)
        kind = resolve_prompt(cfg.prompt, source, seq2seq, local=True)
        return cls(net, tok, seq2seq, where, kind, cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind],
                   cfg.temperature, cfg.top_p)

    def truncate(self, passage: str, max_tokens: int) -> str:
        return truncate_tokens(self.tokenizer, passage, max_tokens)

    def render(self, prompt: str) -> str:
        if self.prompt_kind in CHAT_PROMPTS and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return prompt

    def complete(self, prompts: Sequence[str], sample: bool, seed: int) -> list[Completion]:
        import torch

        enc = self.encode([self.render(p) for p in prompts])
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sample,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
            torch.manual_seed(seed)
        if self.prompt_kind not in CHAT_PROMPTS and not self.seq2seq:
            kwargs.update(stop_strings=["\n"], tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out if self.seq2seq else out[:, enc["input_ids"].shape[1]:]
        pad, tokens_in = self.tokenizer.pad_token_id, enc["attention_mask"].sum(dim=1).tolist()
        result = []
        for row, n_in in zip(new, tokens_in, strict=True):
            n_out = int((row != pad).sum())  # eos == pad for these models: generated tokens only
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            result.append(Completion(text, int(n_in), n_out))
        return result

    def encode(self, texts: list[str]) -> dict[str, Any]:
        """generate()'s inputs. Decoder prompts start with their template's text before the
        passage (the few-shot examples: ~2/3 of an average prompt here); that prefix's KV cache,
        computed once per generator, goes in as `past_key_values`, and each prompt's own tail is
        padded between the prefix and the tail, so only the tails are run through the model.
        Position ids follow the attention mask: a prompt sees the positions it would without."""
        import torch

        head = self._template_head()
        ids = self.tokenizer(texts)["input_ids"] if len(head) >= PREFIX_CACHE_MIN_TOKENS else []
        # The template's last token can merge with the passage's first: keep only what all share.
        n = min([_common_prefix(head, x) for x in ids] + [len(x) - 1 for x in ids], default=0)
        if n < PREFIX_CACHE_MIN_TOKENS:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True)
            return {k: v.to(self.model.device) for k, v in enc.items()}
        prefix = ids[0][:n]
        width = max(len(x) for x in ids) - n
        pad = self.tokenizer.pad_token_id
        rows = [prefix + [pad] * (width - len(x) + n) + x[n:] for x in ids]
        masks = [[1] * n + [0] * (width - len(x) + n) + [1] * (len(x) - n) for x in ids]
        past = copy.deepcopy(self._prefix_cache(prefix))
        past.batch_repeat_interleave(len(ids))
        device = self.model.device
        return {"input_ids": torch.tensor(rows, device=device),
                "attention_mask": torch.tensor(masks, device=device), "past_key_values": past}

    def _template_head(self) -> list[int]:
        """Token ids of the prompt template's text before the passage (tokenised once per kind);
        empty where no cache applies (seq2seq models, chat prompts)."""
        if self.seq2seq or self.prompt_kind in CHAT_PROMPTS:
            return []
        if self._head is None or self._head[0] != self.prompt_kind:
            text = PROMPTS[self.prompt_kind].split("{passage}")[0]
            self._head = (self.prompt_kind, self.tokenizer(text)["input_ids"] if text else [])
        return self._head[1]

    def _prefix_cache(self, prefix: list[int]):
        import torch

        if self._prefix is None or self._prefix[0] != prefix:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prefix], device=self.model.device), use_cache=True)
            self._prefix = (prefix, out.past_key_values)
        return self._prefix[1]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def truncate_tokens(tokenizer, passage: str, max_tokens: int) -> str:
    ids = tokenizer(passage, add_special_tokens=False)["input_ids"]
    return passage if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def truncate_words(passage: str, max_words: int) -> str:
    words = passage.split()
    return passage if len(words) <= max_words else " ".join(words[:max_words])
