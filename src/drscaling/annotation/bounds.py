"""Bounds: how long a query may be, how long an endpoint request may take (light: the CLI's --help
states the bound, and the output parser reads the query limits)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnnotationLimits:
    """How long a query may be: the GX checks enforce it, ICT and the output parser pick within it."""

    min_query_chars: int = 3
    max_query_chars: int = 1000


# An endpoint request gives up after REQUEST_ATTEMPTS tries of at most REQUEST_TIMEOUT_S seconds
# each, with 1 s, 2 s, ... (at most 10 s) between them: 3 x 30 s + 3 s = 93 s by default.
REQUEST_TIMEOUT_S = 30.0
REQUEST_ATTEMPTS = 3


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (0-based)."""
    return min(2.0 ** attempt, 10.0)


def request_bound_s(timeout_s: float, attempts: int) -> float:
    """The longest one endpoint request can take before it is given up."""
    return attempts * timeout_s + sum(backoff_s(a) for a in range(attempts - 1))
