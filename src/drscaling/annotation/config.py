"""Settings of the generated sources, and the interface every generator offers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from drscaling.annotation.bounds import REQUEST_ATTEMPTS, REQUEST_TIMEOUT_S, AnnotationLimits
from drscaling.errors import DrscalingError
from drscaling.weights import DEFAULT_MODEL

API_KEY_ENV = ("DRSCALING_LLM_API_KEY", "OPENAI_API_KEY")


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
    request_timeout_s: float = REQUEST_TIMEOUT_S  # endpoint: one attempt's wait for connect / data
    request_attempts: int = REQUEST_ATTEMPTS  # endpoint: tries per request (timeouts, resets, 408/429/5xx)
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
        return digest({k: getattr(self, k) for k in keys})


@dataclass
class Completion:
    text: str
    tokens_in: int
    tokens_out: int


class Generator(Protocol):
    """Anything that turns prompts into completions (local model, endpoint, test double).

    `complete` returns one Completion per prompt, or raises DrscalingError when it cannot; one
    that finished some prompts before failing raises PartialBatchError carrying them, so that
    work is kept while the failed passages stay to do."""

    name: str
    device: str

    def complete(self, prompts: Sequence[str], sample: bool, seed: int) -> list[Completion]: ...

    def truncate(self, passage: str, max_tokens: int) -> str: ...


class PartialBatchError(DrscalingError):
    """`complete` failed for some prompts: `done` maps a prompt's index to its Completion."""

    def __init__(self, message: str, done: dict[int, Completion]):
        super().__init__(message)
        self.done = done


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
