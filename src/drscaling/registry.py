"""Trained encoders as MLflow Models in the Model Registry.

Every trained encoder is logged once, by its training run, as an MLflow Model (python_function
flavour): `EncoderModel` wraps the project's saved model folder (drscaling.model: backbone/, tokenizer/,
projection.pt, drscaling.json; or dual towers), with a signature of text in, float32 embeddings
[n, dim] out, so that

    mlflow.pyfunc.load_model("models:/drscaling-bert-L2-H128@recommended").predict(["a query"])

serves it offline (params: side = query | passage, max_len = 0 for the model's own length,
batch_size). Loading needs the drscaling package importable (the pickled wrapper refers to it).

Registry: one registered model per shape, `drscaling-<shape>` (`drscaling-<shape>-dual` for dual
towers; `drscaling-<study>-<shape>` for a `drscaling study`'s runs, so datasets never share one); each training run of that shape (another D, source or setting) is a version, tagged with
its config key, D, source and CE, and described by its model card (N, D, source, CE with its 95%
interval, MRR@10; Triton tokens/s and $ per million tokens once a costs file has measured its shape:
`add_costs`, run by `drscaling measure` and by the budget stage on measured costs). The budget stage
sets the alias `@recommended` on the version it picks.

Stored once: the MLflow artifact store holds the model; the run folder's `model/` (what resume,
`export --from-sweep` and `evaluate <folder>` read) is the only other copy, and on a local
artifact store (the default ./mlruns, or any path on the same file system) its files are hard links
to the stored ones, so the bytes are on disk once. On a remote store the run folder is the
training machine's cache of it.

`local_model(...)` is the one resolver of a model argument: a folder, `runs:/<id>/...`, a bare run
id, or `models:/<name>@<alias>` / `models:/<name>/<version>`; evaluate and export both use it.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from drscaling import tracking
from drscaling.errors import DrscalingError
from drscaling.files import finite_copy, to_json

PREFIX = "drscaling-"
ALIAS = "recommended"
LOGGED_NAME = "model"  # the logged model's name in its run: runs:/<id>/model
ARTIFACT = "encoder"  # the key of the model folder among the pyfunc model's artifacts
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
# What the pyfunc model needs at load time (the installed versions are pinned, so nothing is inferred:
# MLflow's requirement inference loads the model in a subprocess, seconds per logged model).
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "numpy", "pandas", "safetensors")


def registered_name(shape: str, towers: str = "shared", study: str | None = None) -> str:
    """The registered model of a shape: one per shape; dual towers and distilled deployments (named by
    their query tower's shape) are models of their own. A study's models carry its name
    (`drscaling-<study>-<shape>`): CEs on different datasets do not compare, so one dataset's budget
    must never move `@recommended` onto a version trained on another."""
    study = study or tracking.study_name()
    name = PREFIX + (f"{study}-" if study else "") + shape + {"dual": "-dual", "distilled": "-distilled"}.get(towers, "")
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


def signature(dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim))]),
        params=ParamSchema([ParamSpec("side", "string", "query"), ParamSpec("max_len", "long", 0),
                            ParamSpec("batch_size", "long", 128)]),
    )


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{name}=={version(name)}")
    return out


# ---------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------

CARD_FIELDS = (  # (key, label) in the order the card shows them
    ("shape", "shape"), ("towers", "towers"), ("n_non_embedding", "N (non-embedding parameters)"),
    ("d", "D (training pairs)"), ("source", "annotation source"), ("init", "initialised from"),
    ("passage_shape", "passage tower"), ("dim", "embedding dimension"), ("pooling", "pooling"), ("ce_test", "test contrastive entropy (this checkpoint)"),
    ("ce_test_interval", "95% interval (bootstrap over test pairs)"),
    ("ce_test_min", "min test CE over training (the laws' point)"), ("ce_test_zero_shot", "zero-shot test CE"),
    ("mrr@10", "MRR@10"), ("ndcg@10", "NDCG@10"), ("converged", "converged"), ("steps", "steps"),
    ("tokens_per_s", "Triton throughput (tokens/s)"), ("usd_per_million_tokens", "$ per million tokens"),
    ("costs_source", "throughput measured by"),
    ("config_key", "config key"), ("annotations_version", "training data (md5)"),
    ("prepared_version", "evaluation data (md5)"), ("data_version", "data.dvc version"), ("run_id", "MLflow run"),
)


def model_card(result: dict, meta, towers: str, versions: dict[str, str],
               interval: tuple[float, float] | None) -> dict:
    """What a user needs to pick a model: N, D, source, CE with its interval, ranking quality."""
    from drscaling import tracking

    return {
        "shape": result["shape"], "towers": towers, "n_non_embedding": int(result["n"]), "d": int(result["d"]),
        "source": result["source"], "init": meta.init, "dim": meta.dim, "pooling": meta.pooling, "steps": result.get("steps"),
        "ce_test": result.get("ce_test_at_best_dev"), "ce_test_interval": list(interval) if interval else None,
        "ce_test_min": result.get("ce_test_min"), "ce_test_zero_shot": result.get("ce_test_zero_shot"),
        "mrr@10": result.get("mrr@10"), "ndcg@10": result.get("ndcg@10"), "converged": result.get("converged"),
        "config_key": result.get("config_key"), "run_id": result.get("run_id"),
        "data_version": tracking.data_version(), **versions,
    }


def distilled_card(result: dict, dim: int, source: str) -> dict:
    """The card of a distilled deployment (distill.py): the student query tower's N, the teacher's
    passage tower, the distilled queries as D, and the pair's test metrics."""
    d = result["distilled"]
    return {"shape": d["query_shape"], "towers": "distilled", "n_non_embedding": d["query_n"],
            "passage_shape": d["passage_shape"], "d": result["distill"]["d"], "source": source, "dim": dim,
            "steps": result["distill"]["steps"], "ce_test": d["ce"], "mrr@10": d.get("mrr@10"),
            "ndcg@10": d.get("ndcg@10")}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def card_markdown(card: dict) -> str:
    name = registered_name(card["shape"], card.get("towers", "shared"))
    rows = [f"| {label} | {_fmt(card[key])} |" for key, label in CARD_FIELDS if card.get(key) is not None]
    use = f'mlflow.pyfunc.load_model("models:/{name}@{ALIAS}").predict(["a query"])'
    return "\n".join([f"# {name}", "", f"Dense retriever, score = <f(q), f(p)>. Texts in, embeddings out: `{use}`", "",
                      "| | |", "|---|---|", *rows, ""])


# ---------------------------------------------------------------------------------------------
# Logging and registering
# ---------------------------------------------------------------------------------------------


def log_encoder(model_dir: str | Path, card: dict, register: bool = True):
    """Log the model folder as this run's MLflow Model (once), register it as a version of its shape's
    registered model with the card as description, and hard-link the folder to the stored copy."""
    import mlflow
    import mlflow.pyfunc

    model_dir = Path(model_dir)
    name = registered_name(card["shape"], card.get("towers", "shared"))
    mlflow.log_text(to_json(finite_copy(card)), "model_card.json")
    mlflow.log_text(card_markdown(card), "model_card.md")
    from drscaling.pyfunc import EncoderModel

    info = mlflow.pyfunc.log_model(
        name=LOGGED_NAME, python_model=EncoderModel(), artifacts={ARTIFACT: str(model_dir)},
        signature=signature(int(card["dim"])), pip_requirements=requirements(),
        registered_model_name=name if register else None,
        tags={"shape": card["shape"], "config_key": str(card.get("config_key"))},
    )
    share_stored_files(model_dir, _stored_folder(info, model_dir.name))
    if register and info.registered_model_version is not None:
        describe_version(name, str(info.registered_model_version), card)
    return info


def log_trained(model_dir: Path, result: dict, meta, towers: str, versions: dict[str, str], embedded=None):
    """What a training run logs of its model: the card (CE interval from the best checkpoint's test
    embeddings when this process holds them; a resumed run may not) and the registered MLflow Model."""
    interval = embedded.ce_interval() if embedded is not None else None
    return log_encoder(model_dir, model_card(result, meta, towers, versions, interval))


def log_training_data(paths, source: str, versions: dict[str, str]) -> None:
    """A training run's inputs: its annotation source's pairs and the prepared splits (train corpus
    negatives, dev/test evaluation), digests = their content hashes."""
    log_dataset(paths.annotations / f"{source}.jsonl", versions["annotations_version"], "training",
                name=f"annotations/{source}")
    log_dataset(paths.prepared, versions["prepared_version"], "evaluation", name=f"prepared/{Path(paths.prepared).name}")


def describe_version(name: str, version: str, card: dict) -> None:
    """The card as the version's description, and its key numbers as version tags (searchable)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.update_model_version(name, version, description=card_markdown(card))
    for key in ("config_key", "d", "source", "ce_test", "ce_test_min", "mrr@10", "n_non_embedding",
                *COST_FIELDS):
        if card.get(key) is not None:  # tag keys cannot hold '@': mrr@10 is mrr_at_10, as in metrics
            client.set_model_version_tag(name, version, key.replace("@", "_at_"), str(card[key]))


# ---------------------------------------------------------------------------------------------
# Measured serving costs on the cards
# ---------------------------------------------------------------------------------------------

COST_FIELDS = ("tokens_per_s", "usd_per_million_tokens", "costs_source")


def measured_shapes(costs: dict, source: str) -> dict[str, dict]:
    """{shape: card fields} for the shared models a costs file measured on Triton: their best median
    throughput and its $ per million tokens, and where that came from. Tower points (a query tower
    at batch 1, a passage tower) are not a shared model's numbers and are left out."""
    towers = {(t.get("shape"), t.get("tokens_per_s")) for t in costs.get("towers") or []}
    where = (f"{source}: measured {costs.get('measured_at')} on {costs.get('device')}, median of "
             f"{costs.get('repeats')} repeats, ${costs.get('device_hour_usd')}/device-hour")
    out = {}
    for p in (costs.get("inference") or {}).get("points") or []:
        if p.get("shape") and (p["shape"], p.get("tokens_per_s")) not in towers:
            out[p["shape"]] = {"n": p.get("n"), "tokens_per_s": float(p["tokens_per_s"]),
                               "usd_per_million_tokens": float(p["usd_per_million_tokens"]), "costs_source": where}
    return out


def _run_card(run_id: str) -> dict | None:
    import json

    import mlflow

    try:
        with tempfile.TemporaryDirectory(prefix="drscaling-card-") as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model_card.json", dst_path=tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - a run without a card (logged before cards existed) or gone
        return None


def add_costs(costs: dict, source: str | Path) -> list[dict]:
    """Put a costs file's measured throughput and $ per million tokens on the card of every registered
    version of each measured shape (the version's description and tags, and its run's model_card.json
    and model_card.md), naming the file and the measurement. A version whose N differs from the
    measured model's, and every shape not measured, is left alone. Returns {name, version, shape}
    per updated version."""
    import mlflow

    client = mlflow.MlflowClient()
    source = str(source)
    if Path(source).exists():
        source = f"{source} (md5 {tracking.file_version(source)[:12]})"
    updated = []
    for shape, fields in measured_shapes(costs, source).items():
        n = fields.pop("n")
        for version in _versions(registered_name(shape)):
            card = _run_card(version.run_id)
            if card is None or (n is not None and card.get("n_non_embedding") not in (None, n)):
                continue
            if all(card.get(k) == v for k, v in fields.items()):
                continue  # already on the card (the budget stage reruns on the same costs file)
            card |= fields
            describe_version(version.name, str(version.version), card)
            client.log_text(version.run_id, to_json(finite_copy(card)), "model_card.json")
            client.log_text(version.run_id, card_markdown(card), "model_card.md")
            updated.append({"name": version.name, "version": str(version.version), "shape": shape})
    return updated


def _stored_folder(info, folder_name: str) -> Path | None:
    """Where the artifact store keeps the logged model's copy of the folder, when it is local."""
    import mlflow

    location = mlflow.MlflowClient().get_logged_model(info.model_id).artifact_location
    if location.startswith("file://"):
        location = location[len("file://"):]
    path = Path(location) / "artifacts" / folder_name
    return path if "://" not in location and path.is_dir() else None


def share_stored_files(local: Path, stored: Path | None) -> int:
    """Replace each file of `local` by a hard link to its identical stored copy (one copy on disk).
    Files differing, or on another file system, are left as they are. Returns the files linked."""
    if stored is None:
        return 0
    linked = 0
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        twin = stored / file.relative_to(local)
        if not twin.is_file() or os.path.samefile(file, twin) or not filecmp.cmp(file, twin, shallow=False):
            continue
        tmp = file.with_name(f".{file.name}.link")
        try:
            os.link(twin, tmp)
            os.replace(tmp, file)  # atomic: the folder never lacks the file
            linked += 1
        except OSError:  # another file system: keep the copy
            tmp.unlink(missing_ok=True)
    return linked


def log_onnx(path: str | Path, name: str, dim: int):
    """An exported graph as an MLflow Model of the onnx flavour (ids and mask in, embedding out)."""
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("int64"), (-1, -1), "input_ids"),
                       TensorSpec(np.dtype("int64"), (-1, -1), "attention_mask")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dim), "embedding")]),
    )
    return mlflow.onnx.log_model(onnx.load(str(path)), name=name, signature=sig,
                                 pip_requirements=[r for r in requirements() if r.split("==")[0] in ("mlflow", "numpy")]
                                 + _pins("onnx", "onnxruntime"))


def _pins(*names: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for n in names:
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{n}=={version(n)}")
    return out


def log_dataset(path: str | Path, digest: str, context: str, name: str | None = None) -> None:
    """A run's input as an MLflow dataset whose digest is the content hash the code versions data by
    (tracking.file_version), so runs on the same data share one dataset entry."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    path = Path(path).resolve()
    dataset = MetaDataset(resolve_dataset_source(str(path)), name=name or path.name, digest=digest[:36])
    # runs logging one new dataset at once (Ray workers) race to insert it: tracking.retry_lost_insert
    tracking.retry_lost_insert(lambda: mlflow.log_input(dataset, context=context))


# ---------------------------------------------------------------------------------------------
# Resolving a model argument
# ---------------------------------------------------------------------------------------------


def _uri(model: str) -> str | None:
    if model.startswith(("runs:/", "models:/")):
        return model
    if RUN_ID_RE.match(model):
        return f"runs:/{model}/{LOGGED_NAME}"
    return None


def _unwrap(folder: Path) -> Path:
    """The drscaling model folder inside a downloaded MLflow Model (the folder itself for runs that
    logged the plain folder)."""
    mlmodel = folder / "MLmodel"
    if not mlmodel.exists():
        return folder
    import yaml

    flavour = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    entry = (flavour.get("artifacts") or {}).get(ARTIFACT)
    if not entry:
        raise DrscalingError(f"{folder} is an MLflow Model but not a drscaling encoder (no '{ARTIFACT}' artifact)")
    return folder / entry["path"]


def model_name(model: str) -> str:
    """A serving name for a model argument: the registered model's name, the run id, or the run folder."""
    if model.startswith("models:/"):
        return re.split(r"[@/]", model[len("models:/"):])[0] or "model"
    if model.startswith("runs:/") or RUN_ID_RE.match(model):
        return (model[len("runs:/"):] if model.startswith("runs:/") else model).split("/")[0] or "model"
    return Path(model).parent.name or "model"


@contextlib.contextmanager
def local_model(model: str | Path) -> Iterator[Path]:
    """A model folder as is (or a packaged pretrained name such as all-MiniLM-L6-v2); `runs:/<id>/model`,
    a bare run id, or `models:/<name>@<alias>` (or `/<version>`) downloaded to a temporary folder for the
    duration of the block."""
    text = str(model)
    if Path(text).exists():
        yield Path(text)
        return
    from drscaling.model.shapes import PACKAGED, resolve

    if text in PACKAGED:  # a pretrained encoder shipped in a wheel, e.g. all-MiniLM-L6-v2 (a zero-shot baseline)
        yield Path(resolve(text))
        return
    uri = _uri(text)
    if uri is None:
        raise DrscalingError(
            f"model not found: {text} (give a model folder, an MLflow run id, runs:/<id>/model, or "
            f"models:/<name>@<alias> such as models:/{PREFIX}bert-L2-H128@{ALIAS})"
        )
    from drscaling import tracking

    tracking.configure()
    import mlflow

    with tempfile.TemporaryDirectory(prefix="drscaling-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a bad run, name or alias
            raise DrscalingError(f"cannot download the model {uri} from MLflow: {exc}") from exc
        yield _unwrap(Path(local))


# ---------------------------------------------------------------------------------------------
# The recommended version
# ---------------------------------------------------------------------------------------------


def _versions(name: str) -> list:
    import mlflow

    try:
        return list(mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))
    except Exception:  # noqa: BLE001 - no such registered model
        return []


def _float_tag(version, key: str) -> float:
    try:
        return float(version.tags.get(key))
    except (TypeError, ValueError):
        return float("inf")


def pick_version(shape: str, config_key: str | None = None):
    """The newest version trained with `config_key`; without one, the version of lowest test CE."""
    versions = _versions(registered_name(shape))
    if config_key:
        versions = [v for v in versions if v.tags.get("config_key") == config_key]
        return max(versions, key=lambda v: int(v.version), default=None)
    return min(versions, key=lambda v: (_float_tag(v, "ce_test"), -int(v.version)), default=None)


def recommend(result: dict) -> dict | None:
    """Set `@recommended` on the version the budget picked: the best measured run that fits the budget
    (its exact config), else the best affordable trained shape (its version of lowest CE). Returns
    {name, version, alias, why}, or None when the registry holds no such version."""
    import mlflow

    run = result.get("best_measured_run") or {}
    best_shape = ((result.get("shapes") or {}).get("best") or {}).get("shape")
    if run.get("shape"):
        version, why = pick_version(run["shape"], run.get("config_key")), "best measured run within the budget"
    elif best_shape:
        version, why = pick_version(best_shape), "best trained shape within the budget"
    else:
        return None
    if version is None:
        return None
    mlflow.MlflowClient().set_registered_model_alias(version.name, ALIAS, version.version)
    return {"name": version.name, "version": str(version.version), "alias": ALIAS, "why": why,
            "uri": f"models:/{version.name}@{ALIAS}"}
