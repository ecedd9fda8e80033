"""Whether a training run converged: the measure training records and the tolerance both training
(metrics.json's `converged`) and the fit's checks (laws) apply. Imports nothing, so the laws package
reads it without importing training."""

from __future__ import annotations

# A run has converged when the best test CE improved by less than this (relative) over the last
# quarter of its steps: more steps would not move the point its law is fitted on.
CONVERGENCE_TOLERANCE = 0.02


def convergence(history: list[dict], steps: int) -> float:
    """Relative improvement of the best test CE over the last quarter of training: (best up to 3/4 of
    the steps - best at the end) / best at the end. Small = the point has reached its plateau. NaN
    when no evaluation falls in the first three quarters (evaluate more often to measure it)."""
    before = [h["ce_test"] for h in history if 0 < h["step"] <= 0.75 * steps]
    if not before or not history:
        return float("nan")
    end = min(h["ce_test"] for h in history)
    return (min(before) - end) / end
