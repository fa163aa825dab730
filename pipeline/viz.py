"""Plots the stages write (PNG, matplotlib's Agg canvas): line plots from lists, training curves,
and the quality-diversity plane of generation.

Every function takes plain lists/dicts and a target path, so the schedule, train and evaluate
stages (and notebooks) share them. Figures are built on `matplotlib.figure.Figure` directly, never
pyplot: no global state, no GUI backend, safe inside Ray workers. The PNG carries no
timestamp or software metadata, so the same data gives the same bytes (DVC does not rebuild
downstream stages for a replotted but unchanged figure). Importing this module does not import
matplotlib.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DPI = 100
SIZE = (7.0, 4.5)


def _figure(size: tuple[float, float] = SIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    # No "Software"/date chunks: byte-identical output for identical data.
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _finite(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list[float], list[float]]:
    """Pairs where both values are finite numbers (missing evaluations are skipped)."""
    out_x, out_y = [], []
    for x, y in zip(xs, ys):
        if x is None or y is None:
            continue
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(fx) and math.isfinite(fy):
            out_x.append(fx)
            out_y.append(fy)
    return out_x, out_y


def line_plot(
    path: str | os.PathLike[str],
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
    logx: bool = False,
    styles: Mapping[str, str] | None = None,
) -> Path:
    """One line per entry of `series` (label -> y values, same length as `x`); markers when few."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        px, py = _finite(x, ys)
        style = (styles or {}).get(label, "o-" if len(px) <= 20 else "-")
        ax.plot(px, py, style, label=str(label), linewidth=1.5, markersize=4)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _save(fig, path)


def training_curves(path: str | os.PathLike[str], history: Sequence[Mapping[str, Any]], title: str = "") -> Path:
    """Loss and bounds (nats/token) against the optimizer step; learning rate on the right panel."""
    steps = [row.get("step") for row in history]
    fig = _figure((10.0, 4.5))
    left = fig.add_subplot(1, 2, 1)
    for key, style in (("loss", "-"), ("train_bound", ":"), ("val_bound", "o-")):
        px, py = _finite(steps, [row.get(key) for row in history])
        if px:
            left.plot(px, py, style, label=key, linewidth=1.5, markersize=3)
    left.set_xlabel("step")
    left.set_ylabel("nats per token")
    left.set_title(title or "training")
    left.grid(True, alpha=0.3)
    left.legend(fontsize="small")
    right = fig.add_subplot(1, 2, 2)
    px, py = _finite(steps, [row.get("lr") for row in history])
    if px:
        right.plot(px, py, "-", label="lr")
    right.set_xlabel("step")
    right.set_ylabel("learning rate")
    right.set_title("schedule")
    right.grid(True, alpha=0.3)
    return _save(fig, path)


def quality_diversity(
    path: str | os.PathLike[str],
    points: Sequence[Mapping[str, Any]],
    *,
    title: str = "quality vs diversity",
    connect: bool = False,
) -> Path:
    """BLEU (quality, up is better) against Self-BLEU (diversity, left is better).

    `points`: dicts with `bleu`, `self_bleu` and an optional `label`; `connect=True` joins them
    in order (a sweep over top-k or temperature).
    """
    fig = _figure((6.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    xs = [p.get("self_bleu") for p in points]
    ys = [p.get("bleu") for p in points]
    px, py = _finite(xs, ys)
    if connect and len(px) > 1:
        ax.plot(px, py, "-", color="tab:blue", alpha=0.6)
    ax.scatter(px, py, color="tab:blue", zorder=3)
    for p in points:
        label = p.get("label")
        fx, fy = _finite([p.get("self_bleu")], [p.get("bleu")])
        if label is not None and fx:
            ax.annotate(str(label), (fx[0], fy[0]), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xlabel("Self-BLEU (lower = more diverse)")
    ax.set_ylabel("BLEU-4 (higher = closer to the references)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def bar_plot(
    path: str | os.PathLike[str],
    labels: Sequence[str],
    values: Sequence[float],
    *,
    errors: Sequence[float] | None = None,
    title: str = "",
    ylabel: str = "",
) -> Path:
    """Bars with optional error bars (e.g. the perplexity bound per seed, or mean +- std)."""
    fig = _figure((6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(labels)))
    ax.bar(
        positions,
        [float(v) for v in values],
        yerr=None if errors is None else [float(e) for e in errors],
        color="tab:blue",
        alpha=0.8,
        capsize=4,
    )
    ax.set_xticks(positions)
    ax.set_xticklabels([str(label) for label in labels])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_spec(path: str | os.PathLike[str], spec: Mapping[str, Any]) -> Path:
    """Draw a plot described by data: {"kind": "line"|"quality_diversity"|"bar", ...}.

    line: x, series (label -> ys), title, xlabel, ylabel, logy; quality_diversity: points,
    connect, title; bar: labels, values, errors, title, ylabel. Lets a library function return
    plot data (JSON-able) and the stage turn it into PNGs.
    """
    kind = spec.get("kind", "line")
    if kind == "line":
        series = spec.get("series")
        if series is None and "y" in spec:
            series = {spec.get("label", "y"): spec["y"]}
        return line_plot(
            path,
            spec["x"],
            series or {},
            title=spec.get("title", ""),
            xlabel=spec.get("xlabel", ""),
            ylabel=spec.get("ylabel", ""),
            logy=bool(spec.get("logy", False)),
        )
    if kind == "quality_diversity":
        return quality_diversity(
            path,
            spec["points"],
            title=spec.get("title", "quality vs diversity"),
            connect=bool(spec.get("connect", True)),
        )
    if kind == "bar":
        return bar_plot(
            path,
            spec["labels"],
            spec["values"],
            errors=spec.get("errors"),
            title=spec.get("title", ""),
            ylabel=spec.get("ylabel", ""),
        )
    raise ValueError(f"unknown plot kind {kind!r}; choose line, quality_diversity or bar")


def curves_plot(
    path: str | os.PathLike[str],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logy: bool = False,
) -> Path:
    """One line per entry of `curves` (label -> (xs, ys)); unlike `line_plot`, each has its own x."""
    fig = _figure((8.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for label, (xs, ys) in curves.items():
        px, py = _finite(xs, ys)
        if px:
            ax.plot(px, py, "o-" if len(px) <= 20 else "-", label=str(label), linewidth=1.3, markersize=3)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize="x-small", ncol=2)
    return _save(fig, path)


def band_curves_plot(
    path: str | os.PathLike[str],
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    zoom_from: float | None = None,
) -> Path:
    """One line per entry (label -> `step`, `mean`, `low`, `high`) with the low-high band shaded:
    a mean over training seeds and its spread. `zoom_from`: the y axis spans the points at x >=
    it (the first evaluations of a training run lie far above where the curves are compared)."""
    fig = _figure((8.0, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    shown: list[float] = []
    for label, curve in curves.items():
        xs, mean = _finite(curve["step"], curve["mean"])
        if not xs:
            continue
        (line,) = ax.plot(xs, mean, "o-" if len(xs) <= 20 else "-", label=str(label), linewidth=1.3, markersize=3)
        low, high = list(curve["low"]), list(curve["high"])
        if len(low) == len(xs) and any(h > lo for lo, h in zip(low, high)):
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        shown += [y for x, ys in zip(xs, zip(low, high)) if zoom_from is None or x >= zoom_from for y in ys]
    if shown and zoom_from is not None:
        pad = 0.05 * ((max(shown) - min(shown)) or 1.0)
        ax.set_ylim(min(shown) - pad, max(shown) + pad)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return _save(fig, path)


def quality_diversity_groups(
    path: str | os.PathLike[str],
    groups: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    title: str = "quality vs diversity",
    joined: Sequence[str] = (),
) -> Path:
    """`quality_diversity` for several models on one axes: group label -> points (`bleu`,
    `self_bleu`, optional `label`); the points of the groups named in `joined` (a top-k sweep)
    are joined by a line, the others (separate models) are not."""
    fig = _figure((8.0, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, points in groups.items():
        px, py = _finite([p.get("self_bleu") for p in points], [p.get("bleu") for p in points])
        if not px:
            continue
        line = ax.plot(px, py, "o-" if name in joined else "o", label=str(name), markersize=5, alpha=0.8)
        for p in points:
            fx, fy = _finite([p.get("self_bleu")], [p.get("bleu")])
            if p.get("label") is not None and fx:
                ax.annotate(
                    str(p["label"]),
                    (fx[0], fy[0]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize="x-small",
                    color=line[0].get_color(),
                )
    ax.set_xlabel("Self-BLEU (lower = more diverse)")
    ax.set_ylabel("BLEU-4 (higher = closer to the references)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize="x-small")
    return _save(fig, path)
