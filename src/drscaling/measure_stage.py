"""The measure stage: load-test served encoders on Triton (a server started here, or one running),
fit $ per token and $ per step against N, draw cost_vs_n.png, put each measured shape's throughput and
$ on its registered versions' model cards (registry.add_costs) and print the result."""

from __future__ import annotations

from pathlib import Path

# params.yaml `measure` keys that are load-test settings (measure_costs' keyword arguments)
LOAD_KEYS = ("batch_sizes", "concurrency", "duration_s", "seq_len", "protocol", "query_seq_len", "query_concurrency",
             "passage_batch", "passage_seq_len", "passage_concurrency", "repeats", "max_spread")


def measure_stage(url: str | None, repo: str | Path, out: Path, server_log: Path, common: dict, load: dict) -> dict:
    """Measure on the server at `url`, else on a Triton started on `repo` (its log at `server_log`,
    outside the possibly versioned costs folder), in the stage's MLflow run; returns the costs."""
    from drscaling import costs, registry, tracking
    from drscaling.serving import TritonServer

    with tracking.stage_run("measure", "measure", {"drscaling.stage": "measure"}):
        if url:
            result = costs.measure_costs(url, out, **common, **load)
        else:
            with TritonServer(repo, log_path=server_log) as server:
                print(f"Triton ready at {server.http_url} (HTTP), {server.grpc_url} (gRPC); log {server.log_path}")
                result = costs.measure_costs(server, out, **common, **load)
        cost_figure(result, out.with_name("cost_vs_n.png"))
        cards = registry.add_costs(result, out)  # tokens/s and $ on the registered versions' cards
        if cards:
            print(f"model cards updated with the measured throughput: "
                  f"{', '.join(sorted({c['name'] for c in cards}))} ({len(cards)} versions)")
    return result


def cost_figure(costs: dict, path: Path) -> None:
    """Draw the costs (draw_cost_figure) to `path` and log it to the active run."""
    import matplotlib.pyplot as plt
    import mlflow

    fig = draw_cost_figure(costs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    mlflow.log_artifact(str(path), artifact_path="figures")


def draw_cost_figure(costs: dict):
    """$ per million tokens (inference) and $ per step (training) against N, log-log: points with the
    range of their repeats, fitted curves with the fit's interval of b in the legend; tick labels that
    never collide (laws.figures.set_log_axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from drscaling.laws.figures import set_log_axis

    parts = [("inference", "usd_per_million_tokens", 1e6, "$ per 1M tokens (served)"),
             ("training", "usd_per_step", 1.0, "$ per training step")]
    parts = [p for p in parts if p[0] in costs]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4.2), squeeze=False)
    for ax, (key, field, scale, label) in zip(axes[0], parts, strict=True):
        pts = costs[key]["points"]
        n = np.array([p["n"] for p in pts], dtype=float)
        y = np.array([p[field] for p in pts])
        lo = hi = y
        if key == "inference" and all("tokens_per_s_repeats" in p for p in pts):
            # $ is inverse to tokens/s: the slowest repeat is the highest cost.
            lo = np.array([p["tokens_per_s"] / max(p["tokens_per_s_repeats"]) for p in pts]) * y
            hi = np.array([p["tokens_per_s"] / min(p["tokens_per_s_repeats"]) for p in pts]) * y
            ax.errorbar(n, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label="measured (median, range of repeats)")
        else:
            ax.scatter(n, y, label="measured")
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
        f = costs[key]["fit"]
        iv = f.get("interval", {}).get("b")
        band = f" (b {iv[0]:.2f}..{iv[1]:.2f})" if iv else ""
        fitted = scale * f["a"] * grid ** f["b"]
        ax.plot(grid, fitted, "--", label=f"fit: {f['a'] * scale:.3g} N^{f['b']:.2f}{band}")
        set_log_axis(ax, "x", grid[0], grid[-1], sizes=True)
        set_log_axis(ax, "y", min(lo.min(), fitted.min()) / 1.15, max(hi.max(), fitted.max()) * 1.15, sizes=False)
        ax.set(xlabel="non-embedding parameters N", ylabel=label, title=key)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def measure_lines(result: dict) -> list[str]:
    """The printout: the setting, each model's throughput and $, each tower's latency or throughput,
    the fits, and where the costs went."""
    from drscaling.cost_stats import format_fit

    lines = [f"{result['repeats']} repeats per setting on {result['device']} (load average at start "
             f"{result['machine'].get('loadavg_1m_start')}, {result['machine'].get('usable_cpus')} usable cores)"]
    for p in result["inference"]["points"]:
        spread = f"  spread {p['tokens_per_s_spread']:.0%}" if "tokens_per_s_spread" in p else ""
        lines.append(f"  {p['shape']:14} N={p['n']:>10}  {p['tokens_per_s']:>10.0f} tokens/s{spread}  "
                     f"${p['usd_per_million_tokens']:.4f} per 1M tokens")
    for t in result.get("towers", []):
        if t["tower"] == "query":
            lat = ", ".join(f"c={x['concurrency']}: p50 {x['p50_ms']:.2f} ms, p99 {x['p99_ms']:.2f} ms, "
                            f"{x['queries_per_s']:.0f} q/s" for x in t["latency"])
            lines.append(f"  query tower   {t['model']:22} {t['shape']:14} batch 1 x {t['seq_len']} tokens: {lat}")
        else:
            lines.append(f"  passage tower {t['model']:22} {t['shape']:14} batch {t['batch']} x {t['seq_len']} "
                         f"tokens: {t['passages_per_s']:.3g} passages/s, {t['tokens_per_s']:.0f} tokens/s")
    lines.append("inference cost fit: " + format_fit(result["inference"]["fit"], "$/token"))
    if "training" in result:
        lines.append("training cost fit:  " + format_fit(result["training"]["fit"], "$/step"))
    return lines
