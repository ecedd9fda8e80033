"""The annotation-source registry, and publishing: <source>.jsonl and its cost file appear only
after the GX checks pass.

A source added here is one class plus one registration; the CLI offers it and publishes what it
returns. The pipeline files (dvc.yaml, params.yaml, pipelines/*.yaml) must name exactly the
registered sources.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from drscaling import cli
from drscaling.annotation import checks, sources
from drscaling.annotation.checks import publish
from drscaling.annotation.format import Annotations, cost_path, rejected_path
from drscaling.annotation.human import positives
from drscaling.data import Split, save_dataset
from drscaling.errors import DrscalingError
from drscaling.files import read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]
NAMES = ["rsync", "vim", "curl", "htop"]


def _split(names: list[str]) -> Split:
    return Split(
        corpus=pd.DataFrame({"pid": [f"p:{n}" for n in names], "text": [f"{n} is a Debian package. It does things." for n in names]}),
        queries=pd.DataFrame({"qid": [f"q:{n}" for n in names], "text": [f"what is {n}" for n in names]}),
        qrels=pd.DataFrame({"qid": [f"q:{n}" for n in names], "pid": [f"p:{n}" for n in names]}),
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared") / "prepared"
    save_dataset({"train": _split(NAMES), "dev": _split(NAMES[:2]), "test": _split(NAMES[2:])}, root)
    return root


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the test to register into; the real one is restored after."""
    monkeypatch.setattr(sources, "REGISTRY", dict(sources.REGISTRY))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return sources


def _cost(name: str, rows: list) -> dict:
    return {"source": name, "pairs": len(rows), "usd_per_pair": 0.0, "usd_total": 0.0, "priced_by": "free"}


# ---------------------------------------------------------------------------------------------
# The registry and the pipeline files
# ---------------------------------------------------------------------------------------------


def test_the_four_sources_are_registered_and_the_cli_offers_exactly_them():
    assert sources.names() == ("human", "ict", "supervised", "llm")
    for source in sources.REGISTRY.values():
        assert source.summary and source.pricing
    parser = cli.build_parser()
    action = next(a for a in parser._subparsers._group_actions[0].choices["annotate"]._actions if a.dest == "source")
    assert tuple(action.choices) == sources.names()
    with pytest.raises(DrscalingError, match="unknown annotation source 'crowd'.*human, ict, supervised, llm"):
        sources.get("crowd")


def _named(entries: list, pattern: str) -> list[str]:
    return sorted(m.group(1) for e in entries if isinstance(e, str) and (m := re.fullmatch(pattern, e.split("#")[0].strip())))


def test_pipeline_files_name_exactly_the_registered_sources():
    registered = sorted(sources.names())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(stages["annotate"]["foreach"]) == registered
    assert _named(stages["sweep"]["do"]["deps"], r"artifacts/annotations/(\w+)\.jsonl") == registered
    assert _named(stages["budget"]["deps"], r"artifacts/annotations/(\w+)\.cost\.json") == registered
    presets = sorted((REPO / "pipelines").glob("*.yaml"))
    assert presets
    for preset in presets:
        listed = (yaml.safe_load(preset.read_text()).get("source") or {}).get("sources") or []
        assert listed and set(listed) <= set(registered), f"{preset.name}: {listed}"
        assert len(listed) == len(set(listed))
    settings = yaml.safe_load((REPO / "params.yaml").read_text())["annotate"]
    assert {k for k, v in settings.items() if isinstance(v, dict)} <= set(registered)


def test_a_new_source_is_one_class_and_one_registration(registry, prepared, tmp_path, capsys):
    class Title(registry.AnnotationSource, name="title", pricing="free"):
        """the package name as the query"""

        def annotate(self, request):
            pairs = positives(request.prepared)
            rows = [{"qid": f"title:{p}", "pid": p, "query": f"the {p.split(':')[1]} package"} for p in pairs["pid"]]
            return Annotations(rows, _cost(self.name, rows))

    assert registry.get("title").summary == "the package name as the query"
    with pytest.raises(ValueError, match="registered twice"):
        class Again(registry.AnnotationSource, name="title", pricing="free"):
            """the same name again"""
    out = tmp_path / "ann" / "title.jsonl"
    assert cli.main(["annotate", "--source", "title", "--prepared", str(prepared), "--out", str(out)]) == 0
    assert "title: 4 pairs" in capsys.readouterr().out
    assert sorted(r["query"] for r in read_jsonl(out)) == sorted(f"the {n} package" for n in NAMES)
    assert read_json(cost_path(out))["pairs"] == 4 and read_json(tmp_path / "ann" / "title.validation.json")["success"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["title.cost.json", "title.jsonl", "title.validation.json"]


# ---------------------------------------------------------------------------------------------
# Publishing: checked first, then renamed into place
# ---------------------------------------------------------------------------------------------


def test_rejected_annotations_leave_nothing_at_the_final_paths(registry, prepared, tmp_path, capsys):
    class Stray(registry.AnnotationSource, name="stray", pricing="free"):
        """points at passages that are not in the train split"""

        def annotate(self, request):
            rows = [{"qid": "stray:1", "pid": "p:rsync", "query": "what is rsync"},
                    {"qid": "stray:2", "pid": "p:nowhere", "query": "a passage that does not exist"}]
            return Annotations(rows, _cost(self.name, rows))

    out = tmp_path / "stray.jsonl"
    out.write_text('{"qid": "old", "pid": "p:vim", "query": "an older set"}\n')  # a stale earlier result
    cost_path(out).write_text("{}\n")
    code = cli.main(["annotate", "--source", "stray", "--prepared", str(prepared), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert not out.exists() and not cost_path(out).exists()
    rejected, report = rejected_path(out), tmp_path / "stray.validation.json"
    assert "annotation validation failed" in err and str(report) in err and str(rejected) in err
    assert [r["pid"] for r in read_jsonl(rejected)] == ["p:rsync", "p:nowhere"]
    assert read_json(cost_path(rejected))["pairs"] == 2 and read_json(report)["success"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stray.rejected.cost.json", "stray.rejected.jsonl", "stray.validation.json"]  # no staging file left


def test_publish_writes_only_after_the_checks_and_then_clears_a_rejected_set(prepared, tmp_path, monkeypatch):
    out, report = tmp_path / "x.jsonl", tmp_path / "x.validation.json"
    good = [{"qid": f"x:{n}", "pid": f"p:{n}", "query": f"about {n}"} for n in NAMES]
    seen_during_checks = []
    real = checks.validate_annotations

    def spy(path, *args, **kwargs):
        seen_during_checks.append((out.exists(), cost_path(out).exists(), Path(path).name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checks, "validate_annotations", spy)
    finished = []
    with pytest.raises(DrscalingError, match="validation failed"):
        publish(out, Annotations([{**good[0], "query": "  "}], _cost("x", good), lambda: finished.append(1)), prepared, report)
    assert rejected_path(out).exists() and not finished
    publish(out, Annotations(good, _cost("x", good), lambda: finished.append(1)), prepared, report)
    assert seen_during_checks == [(False, False, "x.staged.jsonl")] * 2  # checked before anything is final
    assert read_jsonl(out) == good and read_json(cost_path(out))["pairs"] == 4 and finished == [1]
    assert not rejected_path(out).exists() and not cost_path(rejected_path(out)).exists()
    assert read_json(report)["result"]["meta"]["active_batch_definition"]["data_asset_name"] == "asset_annotations_x"


def test_an_empty_set_is_rejected_not_a_crash(prepared, tmp_path):
    with pytest.raises(DrscalingError, match="(?s)file is empty.*nothing was written"):
        publish(tmp_path / "e.jsonl", Annotations([], _cost("e", [])), prepared, tmp_path / "e.validation.json")
    assert not (tmp_path / "e.jsonl").exists()
