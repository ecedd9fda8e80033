"""The annotation-source registry: adding a source is one class that names itself
(`class Mine(AnnotationSource, name="mine", pricing="...")`), which registers it.

A source has a name (the `--source` choice, the <name>.jsonl file, the dvc.yaml `annotate` item),
a way to annotate (its `annotate` returns the pairs and their cost, unwritten) and a way it is
priced (`pricing`, in words; the cost JSON it returns holds usd_per_pair, usd_total, priced_by).
`run` publishes what `annotate` returns through drscaling.annotation.checks.publish, so every source's
<name>.jsonl and cost file appear only after the GX checks pass. Its settings are
params.yaml annotate.<name> (human reads annotate.human_usd_per_pair, as before).

This module is imported to build the CLI: keep its top-level imports light.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from drscaling.errors import DrscalingError

if TYPE_CHECKING:
    from drscaling.annotation.format import Annotations


@dataclass
class Request:
    """What one `drscaling annotate` asks of a source."""

    prepared: Path  # the canonical dataset folder (its train split is annotated)
    out: Path  # <source>.jsonl; the cost file goes beside it
    report: Path  # where the GX report is written
    settings: dict[str, Any] = field(default_factory=dict)  # params.yaml's annotate section
    regenerate: bool = False  # generated sources: generate now instead of taking the shipped file
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields given as flags

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.settings.get(name) or {})


class AnnotationSource(ABC):
    """One way of producing training pairs. A subclass registers itself by naming itself:
    `class Mine(AnnotationSource, name="mine", pricing="..."):` with a one-line docstring (its --help
    summary); an intermediate base class names nothing and is not registered."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help: the class docstring
    pricing: ClassVar[str]  # how its pairs are priced, in words

    def __init_subclass__(cls, name: str | None = None, pricing: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if pricing is not None:
            cls.pricing = pricing
        if name is not None:
            cls.name, cls.summary = name, " ".join((cls.__doc__ or "").split())
            _register(cls)

    @abstractmethod
    def annotate(self, request: Request) -> Annotations:
        """The pairs and their cost JSON, not yet written."""

    def run(self, request: Request) -> dict:
        """Annotate, then publish (checked, then renamed into place); the cost dict."""
        from drscaling.annotation.checks import publish

        annotations = self.annotate(request)
        publish(request.out, annotations, request.prepared, request.report)
        return annotations.cost


REGISTRY: dict[str, AnnotationSource] = {}


def _register(cls: type[AnnotationSource]) -> None:
    if cls.name in REGISTRY:
        raise ValueError(f"annotation source {cls.name!r} is registered twice")
    if not cls.summary or not getattr(cls, "pricing", None):
        raise ValueError(f"annotation source {cls.name!r} needs a docstring (its summary) and a pricing")
    REGISTRY[cls.name] = cls()


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> AnnotationSource:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DrscalingError(f"unknown annotation source {name!r} (known: {', '.join(REGISTRY)})") from None


# ---------------------------------------------------------------------------------------------
# The sources
# ---------------------------------------------------------------------------------------------


class Human(AnnotationSource, name="human",
            pricing="a configured $ per pair (annotate.human_usd_per_pair; the paper's 0.6)"):
    """the dataset's own (query, passage) pairs"""

    def annotate(self, request: Request) -> Annotations:
        from drscaling.annotation.human import human_annotations
        from drscaling.design import HUMAN_USD_PER_PAIR

        price = request.settings.get("human_usd_per_pair", HUMAN_USD_PER_PAIR)
        return human_annotations(request.prepared, price)


class InverseCloze(AnnotationSource, name="ict", pricing="free (no model)"):
    """Inverse Cloze Task: a sentence of the passage is its pseudo-query"""

    def annotate(self, request: Request) -> Annotations:
        from drscaling import params
        from drscaling.annotation.ict import IctSettings, ict_annotations

        return ict_annotations(request.prepared, params.build(IctSettings, request.section(self.name)))


class GeneratedSource(AnnotationSource):
    """A source whose queries a model writes. Without --regenerate the shipped pre-generated file
    (params annotate.<name>.pregenerated) is taken, with the cost it was generated at."""

    pricing = "measured: generation time x $ per device-hour, or tokens x $ per million tokens"

    def annotate(self, request: Request) -> Annotations:
        from drscaling.annotation import generated

        section = request.section(self.name)
        shipped = Path(section.get("pregenerated", f"data/generated/{self.name}.jsonl"))
        if not request.regenerate:
            if not shipped.exists():
                raise DrscalingError(
                    f"no pre-generated {self.name} annotations at {shipped}; generate them with "
                    f"`drscaling annotate --source {self.name} --regenerate [--limit N]` (slow on CPU)")
            return generated.pregenerated_annotations(self.name, shipped, request.prepared)
        config = self.generation_config(request)
        return generated.generated_annotations(self.name, request.prepared, request.out, config,
                                               finetune=self.finetune_config(request))

    def generation_config(self, request: Request):
        from drscaling import params
        from drscaling.annotation.config import GenerationConfig

        config = params.build(GenerationConfig, request.section(self.name).get("generation", {}))
        given = {k: v for k, v in request.generation.items() if v is not None}
        return dataclasses.replace(config, **given)

    def finetune_config(self, request: Request):
        return None


class Supervised(GeneratedSource, name="supervised"):
    """a generator fine-tuned on the human pairs (the docT5query role)"""

    def finetune_config(self, request: Request):
        from drscaling import params
        from drscaling.annotation.config import FinetuneConfig

        return params.build(FinetuneConfig, request.section(self.name).get("finetune", {}))


class ZeroShotLLM(GeneratedSource, name="llm"):
    """a zero-shot LLM, local or behind an OpenAI-compatible endpoint (the paper's Appendix A prompt)"""
