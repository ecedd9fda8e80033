"""A study's stages, defined once: run in-process by `drscaling study`, or written as the study folder's
dvc.yaml and run by `dvc repro` there. Each stage is an existing `drscaling` command (a cmd_* of drscaling/cli/),
run with the study folder as working directory; nothing here re-implements a stage, and nothing here
imports the command line: `drscaling study` hands run_study its in-process runner.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from drscaling.errors import DrscalingError
from drscaling.files import write_text
from drscaling.params import ARTIFACTS as A


def generated(source: str) -> bool:
    """A source a model writes: the shipped pre-generated files are for the embedded data, so a study
    generates them for its own (--regenerate)."""
    from drscaling.annotation.sources import GeneratedSource, get

    return isinstance(get(source), GeneratedSource)


@dataclass
class Stage:
    name: str
    argv: list[str]  # drscaling arguments
    deps: list[str] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)  # DVC-cached outputs
    files: list[str] = field(default_factory=list)  # small outputs kept out of the DVC cache
    params: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def command(self) -> str:
        return "drscaling " + shlex.join(self.argv)


def data_stages(fmt: str, data: str, sizes: tuple[int, int] | None, sources: list[str]) -> list[Stage]:
    """import, validate, tokenizer and one annotate stage per source."""
    size_flags = ["--dev-size", str(sizes[0]), "--test-size", str(sizes[1])] if sizes else []
    prepared, report = f"{A}/prepared", f"{A}/validation/dataset.json"
    stages = [
        Stage("import", ["data", "import", "--format", fmt, data, prepared, *size_flags],
              deps=[] if fmt == "ir_datasets" else [data], outs=[prepared], params=["data"]),
        Stage("validate", ["validate", "--report", report], deps=[prepared], files=[report], params=["validate"]),
        Stage("tokenizer", ["tokenizer", "--out", f"{A}/tokenizer"], deps=[prepared, report],
              outs=[f"{A}/tokenizer"], params=["tokenizer"]),
    ]
    for source in sources:
        regenerate = ["--regenerate"] if generated(source) else []
        stages.append(Stage(f"annotate-{source}", ["annotate", "--source", source, *regenerate], deps=[prepared, report],
                            outs=[f"{A}/annotations/{source}.jsonl"], params=["annotate"],
                            files=[f"{A}/annotations/{source}.cost.json", f"{A}/validation/annotations-{source}.json"]))
    return stages


def law_stages(preset: str, sweeps: list[str], sources: list[str], budget: bool) -> list[Stage]:
    """One sweep stage per sweep, then fit, budget (when there is a joint sweep) and report."""
    folder = f"{A}/sweeps/{preset}"
    inputs = [f"{A}/prepared", f"{A}/tokenizer", *(f"{A}/annotations/{s}.jsonl" for s in sources),
              f"pipelines/{preset}.yaml"]
    stages = [Stage(f"sweep-{k}", ["sweep", "--preset", preset, "--only", k], deps=inputs, params=["train", "sweep"],
                    files=[f"{folder}/results-{k}.jsonl"], metrics=[f"{folder}/metrics-{k}.json"]) for k in sweeps]
    laws = f"{A}/laws/laws.json"
    stages.append(Stage("fit", ["fit", "--preset", preset], deps=[f"{folder}/results-{k}.jsonl" for k in sweeps],
                        params=["fit"], files=[laws, f"{A}/laws/points.jsonl", f"{A}/laws/figures"],
                        metrics=[f"{A}/laws/metrics.json"]))
    report_deps = [laws]
    if budget:
        stages.append(Stage("budget", ["budget"], deps=[laws, *(f"{A}/annotations/{s}.cost.json" for s in sources)],
                            params=["budget", "train.eval.negatives"], files=[f"{A}/budget"]))
        report_deps.append(f"{A}/budget")
    stages.append(Stage("report", ["report", "--out", f"{A}/report/report.md"], deps=report_deps, params=["study"],
                        files=[f"{A}/report/report.md"]))
    return stages


# Runs one stage's `drscaling` arguments. The command line passes its own in-process runner (the stage's
# cmd_* function, errors propagating); the library alone runs the `drscaling` command, as dvc.yaml does.
StageRunner = Callable[[list[str]], None]


def run_command(argv: list[str]) -> None:
    """`drscaling ARGV` in a subprocess of this interpreter, in the working directory; its output streams."""
    proc = subprocess.run([sys.executable, "-m", "drscaling", *argv], env=_env())
    if proc.returncode != 0:
        raise DrscalingError(f"`drscaling {shlex.join(argv)}` failed in {Path.cwd()} (exit {proc.returncode})")


# ---------------------------------------------------------------------------------------------
# DVC
# ---------------------------------------------------------------------------------------------


def dvc_yaml(stages: list[Stage]) -> str:
    def body(s: Stage) -> dict:
        out: dict = {"cmd": s.command()}
        if s.deps:
            out["deps"] = list(s.deps)
        if s.params:
            out["params"] = list(s.params)
        outs = list(s.outs) + [{f: {"cache": False}} for f in s.files]
        if outs:
            out["outs"] = outs
        if s.metrics:
            out["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        return out

    head = ("# A drscaling study as a DVC pipeline (written by `drscaling study --dvc`). `dvc repro` here reruns\n"
            "# exactly the stages a change of data/ or params.yaml affects; every stage reads this folder only.\n")
    return head + yaml.safe_dump({"stages": {s.name: body(s) for s in stages}}, sort_keys=False)


def dvc(root: Path, *args: str, check: bool = True, stream: bool = False) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` in the study folder, with this interpreter's `drscaling` first on PATH."""
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(cmd, cwd=root, env=_env(), text=True, capture_output=not stream)
    if check and proc.returncode != 0:
        detail = "" if stream else f":\n{(proc.stdout or '')[-2000:]}{(proc.stderr or '')[-3000:]}"
        raise DrscalingError(f"`dvc {' '.join(args)}` failed in {root} (exit {proc.returncode}){detail}")
    return proc


def _env() -> dict[str, str]:
    """This interpreter's `drscaling` first on PATH (what dvc.yaml's commands call), DVC analytics off."""
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def init_dvc(root: Path, tracked: str | None) -> None:
    """A DVC project in the study folder (nested in a git repository when there is one), with the copy
    of the user's data as a tracked input."""
    if not (root / ".dvc").exists():
        dvc(root, "init", "--subdir" if _git_tracks(root) else "--no-scm", "-q")
        dvc(root, "config", "core.analytics", "false")
        dvc(root, "config", "core.check_update", "false")
    if tracked:
        dvc(root, "add", "-q", tracked)


def _git_tracks(root: Path) -> bool:
    """Inside a git work tree and not git-ignored (the project ignores studies/): then the study is a
    DVC project nested in the repository (`dvc init --subdir`); else one of its own (`--no-scm`)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    try:
        inside = git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
        return inside and git("check-ignore", "-q", str(root)).returncode != 0
    except OSError:  # no git
        return False


def write_dvc(root: Path, stages: list[Stage]) -> None:
    write_text(root / "dvc.yaml", dvc_yaml(stages))


def commit(root: Path, stages: list[Stage]) -> None:
    """Record stages the study just ran in-process in dvc.lock, so `dvc repro` does not run them again."""
    dvc(root, "commit", "-f", "-q", *(s.name for s in stages))
