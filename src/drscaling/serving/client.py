"""A Triton client (HTTP or gRPC) that turns every failure into a DrscalingError naming the problem."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drscaling.errors import DrscalingError
from drscaling.serving.repository import TEXT_SUFFIX
from drscaling.serving.server import TritonServer


@dataclass
class ModelInfo:
    name: str
    max_sequence_length: int
    max_query_len: int
    max_passage_len: int
    dim: int
    params: dict[str, str]

    @property
    def tower(self) -> str:
        """"query" / "passage" for one tower of a dual pair, "shared" for a single encoder."""
        return self.params.get("tower", "shared")

    @property
    def retriever(self) -> str:
        """The pair's name for a tower (its models are <retriever>-query / -passage), else the model's."""
        return self.params.get("retriever", self.name)

    @property
    def interface(self) -> str:
        """"tensor" (token ids in), "text" (the <name>-text ensemble) or "tokenizer"."""
        return self.params.get("interface", "tensor")

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> ModelInfo:
        """From a model's config as JSON (Triton's answer, or a config.pbtxt read as its protobuf)."""
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        return cls(
            name=name,
            max_sequence_length=int(params.get("max_sequence_length", 512)),
            max_query_len=int(params.get("max_query_len", 32)),
            max_passage_len=int(params.get("max_passage_len", 180)),
            dim=int(cfg["output"][0]["dims"][-1]), params=params,
        )

    def max_len(self, role: str | None) -> int:
        """The default truncation for texts of `role` (queries: the query length, else passages')."""
        n = self.max_query_len if role == "query" else self.max_passage_len
        return min(n, self.max_sequence_length)


class Client:
    """One tritonclient (HTTP or gRPC) with DrscalingError for every failure.

    A tritonclient.http client must stay on the thread that created it: make one per thread.
    """

    def __init__(self, url: str | TritonServer, protocol: str = "http", timeout_s: float = 60.0):
        if protocol not in ("http", "grpc"):
            raise DrscalingError(f"protocol must be 'http' or 'grpc' (got '{protocol}')")
        self.protocol = protocol
        self.server = url if isinstance(url, TritonServer) else None
        address = url.url(protocol) if isinstance(url, TritonServer) else str(url)
        for scheme in ("http://", "https://", "grpc://"):
            if address.startswith(scheme):
                address = address[len(scheme):]
        self.url = address.rstrip("/")
        self.timeout_s = timeout_s
        if protocol == "http":
            import tritonclient.http as mod

            self.mod = mod
            self.client = mod.InferenceServerClient(
                self.url, connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            import tritonclient.grpc as mod

            self.mod = mod
            self.client = mod.InferenceServerClient(self.url)
        self._info: dict[str, ModelInfo] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            msg = exc.message() or str(exc)
            status = str(exc.status() or "")
            if "UNAVAILABLE" in status or "failed to connect" in msg.lower() \
                    or "connection refused" in msg.lower():
                raise self._unreachable(msg) from exc
            raise self._refused(what, exc) from exc
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from exc

    def _refused(self, what: str, exc) -> DrscalingError:
        # The status tells a client mistake (HTTP 400 / INVALID_ARGUMENT: do not retry) from a
        # server fault (500 / INTERNAL)
        status = str(exc.status() or "").removeprefix("StatusCode.")
        code = f" (HTTP {status})" if status.isdigit() else f" ({status})" if status else ""
        return DrscalingError(f"Triton at {self.url} refused {what}{code}: {exc.message() or exc}")

    def _unreachable(self, why: str) -> DrscalingError:
        return DrscalingError(
            f"Triton server at {self.url} ({self.protocol}) is not reachable: {why}. "
            "Start it with `drscaling serve` (or check the URL and port)."
        )

    def check_ready(self, model: str) -> None:
        if not self._call("a health check", self.client.is_server_live):
            raise DrscalingError(f"Triton server at {self.url} is not live")
        if not self._call("a health check", self.client.is_server_ready):
            raise DrscalingError(f"Triton server at {self.url} is up but not ready (still loading?)")
        if not self._call("a model check", self.client.is_model_ready, model):
            raise DrscalingError(
                f"model '{model}' is not ready on Triton at {self.url}; ready models: "
                f"{', '.join(self.ready_models()) or 'none'}"
            )

    def ready_models(self) -> list[str]:
        index = self._call("a repository index", self.client.get_model_repository_index)
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            index = MessageToDict(index).get("models", [])
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    def info(self, model: str) -> ModelInfo:
        if model not in self._info:
            self.check_ready(model)
            if self.protocol == "grpc":
                cfg = self._call("a config request", self.client.get_model_config, model,
                                 as_json=True)["config"]
            else:
                cfg = self._call("a config request", self.client.get_model_config, model)
            self._info[model] = ModelInfo.from_config(model, cfg)
        return self._info[model]

    def infer(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One inference request with arrays sent as they are (the server validates them)."""
        return self.prepare(model, input_ids, attention_mask)()

    def infer_text(self, model: str, texts: Sequence[str], max_length: int | None = None) -> np.ndarray:
        """One request to a text model (<name>-text): texts in, embeddings out; the server tokenises,
        truncating to `max_length` (None: the model's passage length)."""
        return self.prepare_text(model, texts, max_length)()

    def prepare(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray):
        """A zero-argument callable that sends this request again and again: the inputs are
        serialised once, so a load generator spends its CPU on requests, not on encoding."""
        return self._sender(model, self._request({"input_ids": input_ids, "attention_mask": attention_mask}))

    def prepare_text(self, model: str, texts: Sequence[str], max_length: int | None = None):
        """prepare() for a text model: BYTES [batch, 1] of UTF-8 texts, plus max_length per row."""
        return self._sender(model, self._request(text_inputs(texts, max_length)))

    def _sender(self, model: str, request: tuple[list, list]):
        inputs, outputs = request

        def send() -> np.ndarray:
            result = self._call(f"an inference on '{model}'", self.client.infer, model, inputs,
                                outputs=outputs)
            return result.as_numpy("embedding")

        return send

    def prepare_async(self, model: str, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Like prepare, but `submit(done)` returns at once and calls done(error_or_None) from a
        gRPC thread when the answer is in: one Python thread keeps many requests in flight, so a
        load generator on a small machine does not compete with the server for cores (gRPC only;
        tritonclient's HTTP client runs its async calls on gevent in the caller's thread)."""
        if self.protocol != "grpc":
            raise DrscalingError("asynchronous requests need protocol 'grpc'")
        inputs, outputs = self._request({"input_ids": input_ids, "attention_mask": attention_mask})
        what = f"an inference on '{model}'"

        def submit(done) -> None:
            def finished(result, error) -> None:
                done(None if error is None else self._refused(what, error))

            self._call(what, self.client.async_infer, model, inputs, finished, outputs=outputs)

        return submit

    def _request(self, arrays: dict[str, np.ndarray]) -> tuple[list, list]:
        from tritonclient.utils import np_to_triton_dtype

        first, arr = next(iter(arrays.items()))
        if arr.ndim >= 1 and arr.shape[0] == 0:
            raise DrscalingError(f"empty batch: {first} has shape {list(arr.shape)}")
        inputs = []
        for name, arr in arrays.items():
            arr = arr if arr.dtype == np.object_ else np.ascontiguousarray(arr)
            try:
                dtype = np_to_triton_dtype(arr.dtype)
            except Exception:
                dtype = None
            if dtype is None:
                raise DrscalingError(f"{name}: numpy dtype {arr.dtype} cannot be sent to Triton")
            inp = self.mod.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs, [self.mod.InferRequestedOutput("embedding")]


def resolve_tower(client: Client, model: str, role: str) -> str:
    """The served model that embeds `role` texts ("query" / "passage") for `model`.

    `model` is a shared encoder or a tower of that role (used as is), or the name of a dual pair,
    whose `<model>-<role>` tower is used. The other role's tower is refused: a passage tower
    embedding queries (or the reverse) gives silently wrong scores.
    """
    if role not in ("query", "passage"):
        raise DrscalingError(f"role must be 'query' or 'passage' (got '{role}')")
    ready = client.ready_models()
    if model not in ready and f"{model}-{role}" in ready:
        model = f"{model}-{role}"
    info = client.info(model)  # not ready: the usual error naming the ready models
    if info.tower not in ("shared", role):
        raise DrscalingError(
            f"model '{model}' is the {info.tower} tower of '{info.retriever}': {role} texts go through "
            f"'{info.retriever}-{role}' (or pass the pair's name, '{info.retriever}')"
        )
    return model

def text_model(client: Client, model: str) -> str:
    """The text-in ensemble of a tensor model (<model>-text), checked ready; a text model as is."""
    if client.info(model).interface == "text":
        return model
    name = model + TEXT_SUFFIX
    if name not in client.ready_models():
        raise DrscalingError(
            f"model '{model}' has no text ensemble '{name}' on Triton at {client.url}: rebuild the "
            "repository with the ensembles (`drscaling export --repo`, params.yaml serving.text_ensemble: "
            "true), or tokenise on the client (leave out --server-tokenize)"
        )
    return name


def infer_ids(
    url: str | TritonServer, model: str, input_ids: np.ndarray, attention_mask: np.ndarray,
    protocol: str = "http",
) -> np.ndarray:
    """Raw ids in, embeddings out: one request, no client-side checks (for tests and tools)."""
    with Client(url, protocol) as client:
        client.check_ready(model)
        return client.infer(model, input_ids, attention_mask)




def text_inputs(texts: Sequence[str], max_length: int | None = None) -> dict[str, np.ndarray]:
    """A text model's inputs: `text` BYTES [batch, 1] (UTF-8), and `max_length` INT64 [batch, 1] if given."""
    encoded = np.empty((len(texts), 1), dtype=np.object_)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DrscalingError(f"text {i} is a {type(text).__name__}, not a string")
        try:
            encoded[i, 0] = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DrscalingError(f"text {i} cannot be sent as UTF-8 ({exc.reason} at character {exc.start})") from exc
    arrays = {"text": encoded}
    if max_length is not None:
        arrays["max_length"] = np.full((len(texts), 1), max_length, dtype=np.int64)
    return arrays
