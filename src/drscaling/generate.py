"""Compatibility: the generated annotation sources moved to the drscaling.annotation package
(prompts, parsing, local, endpoint, resumable, pricing, finetune, generated) and model weights to
drscaling.weights. The names this module used to define are re-exported from there; setting
PREFIX_CACHE_MIN_TOKENS here (as benchmarks/generate.py does) sets it where it is used."""

from __future__ import annotations

import sys
import types

from drscaling.annotation import local as _local
from drscaling.annotation.config import (  # noqa: F401
    API_KEY_ENV, Completion, FinetuneConfig, GenerationConfig, Generator, PartialBatchError, digest,
)
from drscaling.annotation.endpoint import EndpointGenerator, redact_url  # noqa: F401
from drscaling.annotation.finetune import (  # noqa: F401
    GENERATOR_META, _collate, finetune_examples, finetune_generator,
)
from drscaling.annotation.generated import (  # noqa: F401
    GENERATED_SOURCES, annotate_generated, generated_annotations, pregenerated_annotations, use_pregenerated,
)
from drscaling.annotation.local import (  # noqa: F401
    PREFIX_CACHE_MIN_TOKENS, LocalGenerator, device_name, load_model, resolve_device, truncate_tokens,
    truncate_words,
)
from drscaling.annotation.parsing import (  # noqa: F401
    clean_query, is_copy, parse_json_queries, parse_output, parse_query_line, pick_query, valid_queries,
)
from drscaling.annotation.pricing import price  # noqa: F401
from drscaling.annotation.prompts import (  # noqa: F401
    APPENDIX_A_PROMPT, CHAT_PROMPTS, DEFAULT_MAX_NEW_TOKENS, FEW_SHOT_PROMPT, PASSAGE_PROMPT,
    PASSAGE_QUERY_PROMPT, PROMPTS, resolve_prompt,
)
from drscaling.annotation.resumable import (  # noqa: F401
    _batches, by_length, generate_batch, partial_path, read_partial, run_generation, target_passages,
)
from drscaling.weights import (  # noqa: F401
    DEFAULT_MODEL, SMOLLM2_GGUF, SMOLLM2_PACKAGE, default_cache_dir, ensure_local_model, smollm2_gguf,
)

_digest = digest
_FORWARDED = {"PREFIX_CACHE_MIN_TOKENS": _local}  # tunables read at call time in their own module


class _Forwarding(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _FORWARDED:
            setattr(_FORWARDED[name], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Forwarding
