"""What generated pairs cost: priced by device time, or by tokens for a hosted API."""

from __future__ import annotations

from drscaling.annotation.config import GenerationConfig


def price(totals: dict, cfg: GenerationConfig, fixed_usd: float = 0.0) -> dict:
    """$ for the generation. `usd_per_pair` is the marginal cost of one more pair (what the budget
    model scales, its Zdata); a one-off cost such as fine-tuning is `fixed_usd`, kept apart."""
    if cfg.usd_per_million_tokens is not None:
        usd = (totals["tokens_in"] + totals["tokens_out"]) / 1e6 * cfg.usd_per_million_tokens
        priced_by = f"{cfg.usd_per_million_tokens} $ per million tokens (in + out)"
    else:
        usd = totals["generation_seconds"] / 3600.0 * cfg.usd_per_device_hour
        priced_by = f"generation wall time at {cfg.usd_per_device_hour} $ per device-hour"
    kept = totals["queries_kept"]
    per_pair = usd / kept if kept else 0.0
    hours = totals["generation_seconds"] / 3600.0
    return {
        "usd_generation": usd, "usd_fixed": fixed_usd, "usd_total": usd + fixed_usd,
        "usd_per_pair": per_pair, "usd_per_1k_pairs": per_pair * 1000.0, "priced_by": priced_by,
        "usd_per_device_hour": cfg.usd_per_device_hour, "usd_per_million_tokens": cfg.usd_per_million_tokens,
        "queries_per_second": kept / totals["generation_seconds"] if totals["generation_seconds"] else 0.0,
        "device_hours": hours,
    }


def carried_over(shipped_cost: dict, pairs: int, shipped_rows: int, source_file: str) -> dict:
    """A shipped pre-generated file's cost, for the `pairs` of it that are kept: the per-pair price
    and one-off costs stay what they were when it was generated."""
    cost = dict(shipped_cost)
    per_pair = float(cost.get("usd_per_pair", 0.0))
    cost.update({"pairs": pairs, "shipped_rows": shipped_rows, "dropped_rows": shipped_rows - pairs,
                 "pregenerated_from": source_file, "usd_total": per_pair * pairs + float(cost.get("usd_fixed", 0.0))})
    return cost
