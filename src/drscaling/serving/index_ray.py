"""`drscaling index --executor ray`: a corpus embedded by Ray Data actors across a cluster, written as the
same index files as build_index's (embeddings.npy, faiss.index, pids.json, passages.jsonl, index.json).

Each actor runs the served model in-process: the model.onnx of the Triton model repository (the very graph
Triton serves) with onnxruntime, CUDAExecutionProvider on an actor given a GPU, else the CPU; tokenised by
the tokenizer beside it with the one tokenisation of every client (drscaling.export.token_feeds). One
Triton server would be the bottleneck of a cluster; actors scale with the machines, need no server, and
get the graph and tokenizer through the Ray object store (only the driver reads the repository).

The driver streams the corpus once itself (checking it, writing passages.jsonl and pids.json: bad input
fails before anything is encoded), then Ray Data reads it again on the cluster (`read_text`, so its path
must be readable on every node: shared storage), `map_batches` embeds it in order, and the driver writes
each batch into embeddings.npy as a memory map, never holding the whole corpus.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drscaling.errors import DrscalingError
from drscaling.files import atomic_path
from drscaling.serving.client import ModelInfo, resolve_tower
from drscaling.serving.repository import VERSION
from drscaling.serving.retrieval import corpus_rows, index_meta, write_passages, write_search_index
from drscaling.vector_index import IndexConfig


@dataclass
class RayIndexConfig:
    address: str = ""  # host:port of the head's GCS, ray://host:10001, or "" (RAY_ADDRESS / a local cluster)
    concurrency: int = 0  # encoder actors; 0: one per num_gpus GPUs of the cluster, else one per num_cpus CPUs
    num_cpus: float = 1.0  # per actor; on a CPU also its onnxruntime threads
    num_gpus: float | None = None  # per actor; None: 1 where the cluster has GPUs, else 0
    batch_rows: int = 512  # passages per actor call: sorted by length there, then encoded batch_size at a time
    batch_size: int = 32  # passages per onnxruntime call (build_index's batch size)

    def validate(self) -> None:
        if self.concurrency < 0:
            raise DrscalingError(f"concurrency must be >= 0 (0: as many actors as the cluster holds; got {self.concurrency})")
        if self.num_cpus <= 0:
            raise DrscalingError(f"num_cpus must be > 0 (got {self.num_cpus})")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise DrscalingError(f"num_gpus must be >= 0 (got {self.num_gpus})")
        for name in ("batch_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise DrscalingError(f"{name} must be >= 1 (got {getattr(self, name)})")


class RepositoryModels:
    """A Triton model repository read from disk, answering what resolve_tower asks of a Triton client."""

    def __init__(self, repo: str | Path):
        self.repo = Path(repo)
        if not self.ready_models():
            raise DrscalingError(f"{self.repo} holds no model (no */config.pbtxt): build the repository with "
                                 "`drscaling export --repo` first, or pass it with --repo")

    def ready_models(self) -> list[str]:
        return sorted(p.parent.name for p in self.repo.glob("*/config.pbtxt"))

    def info(self, model: str) -> ModelInfo:
        from google.protobuf.json_format import MessageToDict
        from google.protobuf.text_format import Parse
        from tritonclient.grpc.model_config_pb2 import ModelConfig

        path = self.repo / model / "config.pbtxt"
        if not path.exists():
            raise DrscalingError(f"model '{model}' is not in the repository {self.repo}; its models: "
                                 f"{', '.join(self.ready_models())}")
        cfg = MessageToDict(Parse(path.read_text(), ModelConfig()), preserving_proto_field_name=True)
        info = ModelInfo.from_config(model, cfg)
        if info.interface != "tensor":
            raise DrscalingError(f"model '{model}' is a {info.interface} model: name the encoder it wraps "
                                 f"({info.params.get('encoder', model)})")
        return info


def model_files(repo: Path, info: ModelInfo, tokenizer: str | Path | None = None) -> dict[str, bytes]:
    """{path: bytes} of the graph Triton serves (model.onnx) and the tokenizer beside it (or `tokenizer`)."""
    from drscaling.model.tokenizer import load_tokenizer

    graph = repo / info.name / VERSION / info.params.get("onnx_file", "model.onnx")
    tok = Path(tokenizer) if tokenizer is not None else repo / info.name / VERSION / "tokenizer"
    if not graph.exists():
        raise DrscalingError(f"{graph} not found: the repository's model '{info.name}' has no ONNX graph")
    load_tokenizer(tok)  # a missing or broken tokenizer fails here, not in every actor
    files = {"model.onnx": graph.read_bytes()}
    files |= {f"tokenizer/{p.relative_to(tok)}": p.read_bytes() for p in sorted(tok.rglob("*")) if p.is_file()}
    return files


def load_encoder(files: dict[str, bytes], batch_size: int, threads: int,
                 providers: list[str]) -> Callable[[list[str], int], np.ndarray]:
    """model_files' graph and tokenizer as an encode function. The files are loaded from a temp folder
    removed at once: Ray ends actors without running finalizers, so a folder kept for an actor's life
    stayed behind."""
    from drscaling.export import ort_encode_fn, ort_session
    from drscaling.model.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="drscaling-index-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        session = ort_session(root / "model.onnx", threads=threads, providers=providers)
        return ort_encode_fn(session, load_tokenizer(root / "tokenizer"), batch_size)


class Encoder:
    """A Ray Data actor: JSONL lines of the corpus in, {pid, embedding} out, the graph run in-process."""

    def __init__(self, files: list, max_len: int, dim: int, batch_size: int, threads: int):
        import ray

        providers = ["CPUExecutionProvider"]
        if ray.get_gpu_ids():
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DrscalingError("an index actor got a GPU but its onnxruntime has no CUDAExecutionProvider: "
                                     "install onnxruntime-gpu on the GPU nodes, or run with --num-gpus 0")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.encode = load_encoder(ray.get(files[0]), batch_size, threads, providers)
        self.max_len, self.dim = max_len, dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the driver checked every line before encoding started; blank lines are skipped as it skips them
        rows = [json.loads(line) for line in batch["text"] if line.strip()]
        pids = np.array([str(r["pid"]) for r in rows], dtype=object)
        if not rows:
            return {"pid": pids, "embedding": np.zeros((0, self.dim), dtype=np.float32)}
        return {"pid": pids, "embedding": self.encode([r["text"] for r in rows], self.max_len)}


def actors_and_gpus(ray, cfg: RayIndexConfig) -> tuple[int, float]:
    """(encoder actors, GPUs per actor): the configured ones, else what the cluster's resources hold."""
    total = ray.cluster_resources()
    gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if total.get("GPU", 0) > 0 else 0.0)
    if cfg.concurrency:
        return cfg.concurrency, gpus
    if gpus > 0:
        return max(1, int(total.get("GPU", 0) // gpus)), gpus
    return max(1, int(total.get("CPU", 1) // cfg.num_cpus)), gpus


def _encode(ray, corpus: Path, pids: list[str], info: ModelInfo, files: dict[str, bytes], cfg: RayIndexConfig,
            out: Path) -> np.ndarray:
    """Embed the corpus on the cluster into `out` (an .npy memory map), in corpus order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # batches come back in corpus order
    ctx.enable_progress_bars = False  # the driver's bar counts passages
    ctx.print_on_execution_start = False
    actors, gpus = actors_and_gpus(ray, cfg)
    # Reading and splitting lines is light: it takes no CPU from the actors, which may hold them all.
    ds = ray.data.read_text(str(corpus), num_cpus=0).map_batches(
        Encoder, batch_size=cfg.batch_rows, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.num_cpus, num_gpus=gpus,
        fn_constructor_kwargs={"files": [ray.put(files)], "max_len": info.max_len("passage"), "dim": info.dim,
                               "batch_size": cfg.batch_size, "threads": max(1, int(cfg.num_cpus))})
    emb = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(pids), info.dim))
    done = 0
    with tqdm(total=len(pids), desc=f"index {info.name} ({actors} Ray actor{'s' * (actors > 1)})") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["pid"])
            if batch["pid"].tolist() != pids[done : done + n]:
                raise DrscalingError(f"{corpus} changed while it was indexed (pids differ from line {done + 1} on)")
            emb[done : done + n] = batch["embedding"]
            done += n
            bar.update(n)
    if done != len(pids):
        raise DrscalingError(f"{corpus} changed while it was indexed ({done} passages encoded, {len(pids)} read)")
    emb.flush()
    return emb


def build_index_ray(
    repo: str | Path, model: str, corpus_path: str | Path, out_dir: str | Path, cfg: RayIndexConfig | None = None,
    index: IndexConfig | None = None, tokenizer: str | Path | None = None,
) -> dict:
    """build_index's files and index.json, the corpus embedded on a Ray cluster by `model` of the model
    repository `repo` (a shared encoder, a passage tower, or a dual pair's name). Returns index.json."""
    from drscaling.executors import connect

    cfg, index = cfg or RayIndexConfig(), index or IndexConfig()
    cfg.validate()
    index.validate()
    models = RepositoryModels(repo)
    info = models.info(resolve_tower(models, model, "passage"))
    files = model_files(Path(repo), info, tokenizer)
    corpus = Path(corpus_path).resolve()  # the workers read it: an absolute path (shared storage)
    with connect(cfg.address) as ray, atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        pids = write_passages(tmp, corpus_rows(corpus_path))  # checks every line before encoding
        meta = index_meta(info, len(pids), corpus_path, index)  # and the index settings (nlist <= n)
        try:
            emb = _encode(ray, corpus, pids, info, files, cfg, tmp / "embeddings.npy")
        except DrscalingError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's task, actor and data errors: say what failed, briefly
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise DrscalingError(f"encoding {corpus} on the Ray cluster failed: {lines[-1] if lines else exc}") from exc
        write_search_index(tmp, emb, index, meta)
        del emb  # the memory map closed before the folder moves into place
    return meta
