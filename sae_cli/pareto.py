"""Pareto plots of a sweep: L0 against FVU and L0 against delta LM loss, every variant on one chart per
(layer, site), the frontier drawn. Lower is better on both axes, so the frontier is the lower-left staircase.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch): the library can
run in any process, headless or not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# (column, axis label) of the charts drawn per (layer, site).
METRICS = (("fvu", "FVU (fraction of variance unexplained)"), ("delta_lm_loss", "delta LM loss (nats/token)"))
MARKERS = "osD^vP*Xph"


def pareto_front(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points that no other point matches or beats on both coordinates (lower is better),
    ordered by x; NaN points are never on it, and of equal points only the first."""
    order = sorted(
        (i for i in range(len(x)) if math.isfinite(x[i]) and math.isfinite(y[i])), key=lambda i: (x[i], y[i])
    )
    front: list[int] = []
    best = math.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return front


def chart_path(folder: Path, layer: int, site: str, metric: str) -> Path:
    return folder / f"L{layer}-{site}-{metric}.png"


def plot_sweep(rows: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """One PNG per (layer, site) and metric that has values; returns the paths written. A metric with no
    finite value (delta LM loss of a sweep run with --no-model) gets no chart."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for layer, site in sorted({(int(r["layer"]), str(r["site"])) for r in rows}):
        group = [r for r in rows if int(r["layer"]) == layer and r["site"] == site]
        for metric, label in METRICS:
            if not any(_finite(r.get(metric)) and _finite(r.get("l0")) for r in group):
                log.info("no %s values for layer %d %s: no chart", metric, layer, site)
                continue
            path = chart_path(folder, layer, site, metric)
            plot_chart(group, metric, label, f"layer {layer} {site}", path, useless_level(group, metric))
            written.append(path)
    return written


def useless_level(rows: list[dict[str, Any]], metric: str) -> tuple[float, str] | None:
    """The value at which an SAE explains nothing, with its label: FVU 1 (the mean predicts as well) and, for the
    delta LM loss, zeroing the site (CE recovered 0; the mean over members of the measured zero-ablation delta)."""
    if metric == "fvu":
        return 1.0, "FVU 1: no better than the mean"
    if metric == "delta_lm_loss":
        zs = [r["ce_zero_ablation"] - r["ce_clean"] for r in rows if _finite(r.get("ce_zero_ablation"))]
        zs = [z for z in zs if math.isfinite(z)]
        if zs:
            return sum(zs) / len(zs), "zero ablation of the site"
    return None


def plot_chart(
    rows: list[dict[str, Any]],
    metric: str,
    label: str,
    title: str,
    path: Path,
    useless: tuple[float, str] | None = None,
) -> None:
    """Measured L0 (log x) against `metric`: one colour and marker per variant, one line per (variant, width)
    through its L0 targets, the Pareto frontier over all of them as a black staircase. `useless` (value, label):
    drawn as a dashed line when the data comes near it; members beyond it (short or failed runs) are left above
    the chart, with a count, so that they do not squash the useful range."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    pts = [r for r in rows if _finite(r.get(metric)) and _finite(r.get("l0"))]
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _member_lines(ax, pts, metric)
    front = pareto_front([r["l0"] for r in pts], [r[metric] for r in pts])
    if front:
        fx, fy = [pts[i]["l0"] for i in front], [pts[i][metric] for i in front]
        ax.step(fx, fy, where="post", color="black", linewidth=1.2, alpha=0.6, label="Pareto frontier")
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
    if useless is not None:
        _useless_line(ax, [r[metric] for r in pts], *useless)
    ax.set_xscale("log")
    # Plain numbers (20, 50, 100) on the log axis instead of 2 x 10^1.
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("L0 (mean active latents per held-out token; labels: L0 target)")
    ax.set_ylabel(label)
    ax.set_title(f"{title}: L0 vs {metric} (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def _member_lines(ax: Any, pts: list[dict[str, Any]], metric: str) -> None:
    """One line per (variant, objective, width) through its L0 targets, each point labelled with its target:
    colour and marker by variant, line style by (objective, width)."""
    variants = sorted({r["variant"] for r in pts})
    styles = ["-", "--", ":", "-."]
    colors = [f"C{i % 10}" for i in range(len(variants))]
    kinds = sorted({(r.get("objective", "local"), int(r["d_sae"])) for r in pts})
    widths = {w for _, w in kinds}
    for vi, variant in enumerate(variants):
        for ki, (objective, width) in enumerate(kinds):
            line = sorted(
                (
                    r
                    for r in pts
                    if r["variant"] == variant
                    and int(r["d_sae"]) == width
                    and r.get("objective", "local") == objective
                ),
                key=lambda r: r["l0"],
            )
            if not line:
                continue
            name = variant + ("" if objective == "local" else f" {objective}")
            name += "" if len(widths) == 1 else f" w{width}"
            ax.plot(
                [r["l0"] for r in line],
                [r[metric] for r in line],
                linestyle=styles[ki % len(styles)],
                marker=MARKERS[vi % len(MARKERS)],
                color=colors[vi],
                alpha=0.85,
                label=name,
            )
            for r in line:
                ax.annotate(
                    f"{r['l0_target']:g}",
                    (r["l0"], r[metric]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=colors[vi],
                )


def _useless_line(ax: Any, ys: list[float], level: float, text: str) -> None:
    """The level where an SAE explains nothing, when the data comes near it; members beyond it stay above the
    chart, counted in its corner."""
    above = [y for y in ys if y > 1.05 * level]
    if above or max(ys) > 0.5 * level:  # the level is near the data: draw it (a far one would squash it)
        ax.axhline(level, color="grey", linestyle="--", linewidth=1, label=text)
    if above and len(above) < len(ys):
        ax.set_ylim(min(0.0, *ys), 1.08 * level)
        ax.text(
            0.99, 0.98, f"{len(above)} member(s) above the chart", transform=ax.transAxes, ha="right",
            va="top", fontsize=8, color="grey",
        )  # fmt: skip


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
