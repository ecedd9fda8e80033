"""Serve exported encoders with NVIDIA Triton Inference Server, and talk to it.

Modules, by concept:
- repository: the model repository (`build_model_repository`, `build_tower_repository`, config rendering)
- server: the tritonserver process (`TritonServer`, `serve`)
- client: one tritonclient with clear errors (`Client`, `ModelInfo`, `resolve_tower`, `infer_ids`)
- retrieval: texts to embeddings and the passage index (`encode_texts`, `build_index`, `search`)
- index_ray: the same index from Ray Data actors running the repository's graph on a cluster
  (`build_index_ray`, `RayIndexConfig`; `drscaling index --executor ray`)

Dual towers (ScalingNote; `build_tower_repository` on a dual export folder) are two models,
`<name>-query` and `<name>-passage`. Each config carries the parameters `tower` ("query",
"passage"; "shared" for a single encoder) and `retriever` (<name>), so clients find the right tower
by role: `encode_texts(..., role="query")`, `build_index` and `search` accept either a tower's own
name or the pair's <name>; an index records which model its queries must go through.

Two flavours from one template:
- "python" (default here): `backend: "python"`; model.py runs onnxruntime (CUDA provider on a GPU
  instance, CPU otherwise). Works with the tritonserver binary carried by the `nvidia-pytriton`
  wheel, which has no onnxruntime backend. `TritonServer` / `serve` start that binary.
- "onnxruntime": `platform: "onnxruntime_onnx"`, for the NGC Triton container on GPU hosts:

    # params.yaml serving: {flavour: onnxruntime, kind: KIND_GPU}, then
    drscaling export --from-sweep quick --out artifacts/export --repo artifacts/serving/repo
    docker run --gpus all --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 \\
        -v "$PWD/artifacts/serving/repo:/models" nvcr.io/nvidia/tritonserver:24.10-py3 \\
        tritonserver --model-repository=/models

  (24.10 is Triton 2.51, the release of the binary used here; any later -py3 tag works too.)
  The clients below (`encode_texts`, `build_index`, `search`, `costs.measure`) work against either.

Every client error (server down or not ready, unknown model, wrong dtype or shape, empty batch,
sequence too long) is raised as a DrscalingError naming the problem; the server keeps serving.
"""

from drscaling.serving.client import Client, ModelInfo, infer_ids, resolve_tower
from drscaling.serving.repository import (
    FLAVOURS,
    KINDS,
    ONNX_FILES,
    TEMPLATES,
    TOWER_ROLES,
    VERSION,
    RepositoryConfig,
    build_model_repository,
    build_tower_repository,
    render_config,
)
from drscaling.serving.index_ray import RayIndexConfig, build_index_ray
from drscaling.serving.retrieval import build_index, encode_texts, search
from drscaling.serving.server import (
    ServerConfig,
    TritonServer,
    free_ports,
    serve,
    triton_dist,
)

__all__ = [
    "FLAVOURS", "KINDS", "ONNX_FILES", "TEMPLATES", "TOWER_ROLES", "VERSION", "Client", "ModelInfo",
    "RayIndexConfig", "RepositoryConfig", "ServerConfig", "TritonServer", "build_index", "build_index_ray",
    "build_model_repository",
    "build_tower_repository", "encode_texts", "free_ports", "infer_ids", "render_config",
    "resolve_tower", "search", "serve", "triton_dist",
]
