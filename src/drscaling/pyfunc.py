"""The python_function MLflow Model of a trained encoder (see registry.py): texts in, embeddings out.

Its own module, imported only where a model is logged or loaded: mlflow.pyfunc is a heavy import.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np


def _texts(model_input: Any) -> list[str]:
    """A list of strings from what pyfunc hands over (a one-column DataFrame, a list, an array)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise ValueError(f"expected one column of texts, got {model_input.shape[1]} columns")
        values = model_input.iloc[:, 0].tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(np.asarray(model_input).ravel())
    if not all(isinstance(v, str) for v in values):
        raise ValueError("every input must be a text (str)")
    return values


def _model_folder(artifacts: dict[str, str]) -> str:
    """The saved model folder: the one artifact the model was logged with (registry.log_encoder
    names it; the name is the logger's business, the loader needs only the folder)."""
    if len(artifacts) != 1:
        raise ValueError(f"a drscaling encoder holds one artifact, its model folder (got {sorted(artifacts)})")
    return next(iter(artifacts.values()))


class EncoderModel(mlflow.pyfunc.PythonModel):
    """Texts -> float32 embeddings [n, dim] with a saved drscaling retriever (shared or dual towers)."""

    def load_context(self, context) -> None:
        import torch

        from drscaling.model.saved import load_retriever

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.retriever = load_retriever(_model_folder(context.artifacts)).to(self.device)

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:  # noqa: ARG002
        from drscaling.model.retriever import SIDES  # loaded with the model (load_context)

        params = params or {}
        side = params.get("side") or "query"
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)} (got '{side}')")
        tower = getattr(self.retriever, side)
        own = tower.meta.max_query_len if side == "query" else tower.meta.max_passage_len
        max_len = int(params.get("max_len") or 0) or own
        return tower.encode(_texts(model_input), max_len, int(params.get("batch_size") or 128), self.device)
