"""The audit's two charts, drawn the way the evaluation's are (matplotlib, Agg backend, PNG, imported
only here): where the attention goes (the distribution of each region's share) and what changes the
answer (the mean change of p(positive) and the share of flipped decisions per perturbation)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermcam.evaluate.report import pyplot, save_figure  # one way to draw and write a chart

if TYPE_CHECKING:
    from dermcam.audit.attention import AttentionResult
    from dermcam.audit.stress import StressResult


def plot_attention(result: AttentionResult, path: Path, title: str = "") -> Path:
    """One box per region: its share of the CAM's mass over the images where it exists, the line at
    one half marking "most of the attention"; each box says how many images it holds most of."""
    from dermcam.audit.attention import MOST

    plt = pyplot()
    summary = result.region_summary(result.images)
    regions = list(result.regions)
    data = [[i.shares.get(r, 0.0) for i in result.images if result.exists(i, r)] for r in regions]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    positions = [k for k, values in enumerate(data) if values]
    if positions:
        ax.boxplot([data[k] for k in positions], positions=positions, widths=0.5, whis=(5, 95),
                   showfliers=True, flierprops={"markersize": 3})
    ax.axhline(MOST, color="tab:red", linestyle="--", linewidth=1, label=f"most of the attention (> {MOST:g})")
    labels = []
    for region, values in zip(regions, data):
        s = summary[region]
        labels.append(f"{region.replace('_', '-')}\n{s['most']}/{s['n']} images" if values else f"{region}\nnone")
    ax.set_xticks(range(len(regions)), labels=labels, fontsize=8)
    ax.set_xlim(-0.6, len(regions) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of the CAM's mass")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or "where the attention goes", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_stress(result: StressResult, path: Path, title: str = "") -> Path:
    """Left: the mean change of p(positive) per perturbation with its 95% interval; right: the share of
    decisions that flip with its Wilson interval. The stable band of each is shaded; a perturbation
    outside the rule is drawn red."""
    from dermcam.audit.stress import STABLE_DELTA, STABLE_FLIPS, mean_interval

    plt = pyplot()
    items = list(reversed(result.results))  # the first perturbation on top
    y = np.arange(len(items))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 0.32 * len(items) + 1.6), dpi=120, sharey=True)
    for k, r in enumerate(items):
        colour = "tab:blue" if r.stable else "tab:red"
        ci = mean_interval(r.delta)
        err = [[max(0.0, r.mean_delta - ci[0])], [max(0.0, ci[1] - r.mean_delta)]] if ci else None
        left.errorbar(r.mean_delta, k, xerr=err, fmt="o", color=colour, markersize=4, capsize=2)
        flips = r.to_dict()
        fci = flips["flip_ci"]
        ferr = [[max(0.0, r.flip_share - fci[0])], [max(0.0, fci[1] - r.flip_share)]] if fci else None
        right.errorbar(r.flip_share, k, xerr=ferr, fmt="o", color=colour, markersize=4, capsize=2)
    left.axvspan(-STABLE_DELTA, STABLE_DELTA, color="tab:green", alpha=0.12, label=f"|change| < {STABLE_DELTA:g}")
    left.axvline(0, color="black", linewidth=0.8)
    right.axvspan(0, STABLE_FLIPS, color="tab:green", alpha=0.12, label=f"flips < {STABLE_FLIPS:.0%}")
    left.set_yticks(y, labels=[f"{r.name} ({'artefact' if r.kind == 'artefact' else 'acq.'})" for r in items],
                    fontsize=8)
    left.set_xlabel(f"mean change of p({result.positive})")
    right.set_xlabel("share of decisions flipped")
    right.set_xlim(left=0)
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle(title or "what changes the answer", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
