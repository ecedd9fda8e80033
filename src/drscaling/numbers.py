"""Number helpers that several stages share: a value read from a file as a finite float (or None),
and dollars as text. Kept free of imports so any stage (and training) can use them."""

from __future__ import annotations

import math
from typing import Any


def finite_or_none(value: Any) -> float | None:
    """float(value) when it is a finite number; None for a missing, non-numeric, NaN or infinite one."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def money(x: float) -> str:
    """Dollars: whole dollars from $100 on, cents below."""
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}"
