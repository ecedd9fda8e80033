"""The export stage: trained encoders -> ONNX variants (parity-checked, optionally scored) -> a Triton
model repository. `drscaling export` parses its flags and calls these."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from drscaling.errors import DrscalingError


def export_targets(model: str | None, name: str | None, sweeps: Path, preset: str | None) -> dict[str, str]:
    """name -> model to export: every shape of `preset`'s model sweep (results in <sweeps>/<preset>),
    else the one `model` (named `name`, else after the model)."""
    if preset:
        from drscaling.sweep import merge_results

        rows = [r for r in merge_results(sweeps / preset) if r["sweep"] == "model"]
        if not rows:
            raise DrscalingError(f"the {preset} preset has no model sweep results to export")
        return {r["shape"]: r["model_dir"] for r in rows}
    if model:
        from drscaling.registry import model_name

        return {name or model_name(str(model)): model}
    raise DrscalingError("give --model (a model folder, runs:/<id>/model or models:/<name>@<alias>) or --from-sweep PRESET")


def export_one(model: str | Path, out: Path, variants: list[str], prepared, eval_cfg, repo: Path | None, name: str,
               serve_cfg: dict, quality: bool = True) -> dict:
    """Export one model (its own MLflow run), score its variants unless `quality` is off, and add it
    to the Triton repository `repo` when given; params.yaml `serving` keys set the repository options."""
    from drscaling import export, serving, tracking
    from drscaling.evaluate import ce_metric

    with tracking.stage_run("export", f"export-{name}", {"drscaling.stage": "export", "model": name}):
        record = export.export_onnx(model, out, variants=tuple(variants))
        scored = export.quality_delta(out, ce_metric(prepared, eval_cfg), model_dir=model) if quality else None
    if repo is not None:
        from drscaling.model.saved import is_dual

        # Dual towers become two models, <name>-query and <name>-passage.
        build = serving.build_tower_repository if is_dual(out) else serving.build_model_repository
        # params.yaml `serving` keys that are repository settings; the rest keep RepositoryConfig's defaults
        options = {f.name: serve_cfg[f.name] for f in dataclasses.fields(serving.RepositoryConfig) if f.name in serve_cfg}
        build(out, repo, name, **options)
    return {"record": record, "quality": scored}


def export_lines(name: str, variants: list[str], result: dict, served: bool) -> list[str]:
    """The printout of one exported model: CE per variant (or that it was not scored), and per tower
    its fp32 parity and size."""
    q = result["quality"]
    if q is None:
        lines = [f"{name}: exported {', '.join(variants)} (parity checked; CE not scored: --no-quality)"]
    else:
        deltas = ", ".join(f"{v}: CE {d['value']:.4f} ({d['delta']:+.4f})" for v, d in q["variants"].items()
                           if d.get("value") is not None)
        lines = [f"{name}: exported {', '.join(variants)}; torch CE {q['torch']:.4f}; {deltas}"]
    for side, rec in (result["record"].get("towers") or {}).items():
        fp32 = rec["variants"]["fp32"]
        lines.append(f"  {side} tower {rec['shape']} (N={rec['n_non_embedding']:,}): fp32 max |diff| "
                     f"{fp32['parity']['max_abs_diff']:.2g}, {fp32['size_bytes'] / 2**20:.0f} MiB"
                     + (f"; served as {name}-{side}" if served else ""))
    return lines
