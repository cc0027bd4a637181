"""Routing heatmaps: per layer, each domain's share of tokens per expert, as PNG bytes or an RGB array.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so this
works headless, in worker processes and next to a TensorBoard writer.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_COLUMNS = 8  # layer panels per row


def routing_heatmap_png(
    shares: torch.Tensor | np.ndarray, domain_names: list[str], title: str, nmi: list[float] | None = None
) -> bytes:
    """PNG of :func:`routing_figure`."""
    figure = routing_figure(shares, domain_names, title, nmi)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def routing_heatmap_array(
    shares: torch.Tensor | np.ndarray, domain_names: list[str], title: str, nmi: list[float] | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 image of :func:`routing_figure`, e.g. for ``SummaryWriter.add_image(..., dataformats="HWC")``."""
    figure = routing_figure(shares, domain_names, title, nmi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def routing_figure(
    shares: torch.Tensor | np.ndarray, domain_names: list[str], title: str, nmi: list[float] | None = None
) -> Figure:
    """One panel per layer: rows are domains, columns experts, colour the share of the domain's tokens.

    ``shares``: (layers, domains, K) or (domains, K), e.g. from
    :func:`mole.routing_analysis.domain_expert_shares`; ``nmi``: optional per-layer values for the panel titles.
    """
    values = np.asarray(shares.detach().cpu() if isinstance(shares, torch.Tensor) else shares, dtype=float)
    if values.ndim == 2:
        values = values[None]
    layers, domains, experts = values.shape
    if domains != len(domain_names):
        raise ValueError(f"shares has {domains} domain rows but {len(domain_names)} domain names were given")
    columns = max(1, min(layers, MAX_COLUMNS))
    rows = math.ceil(layers / columns)
    panel_w, panel_h = 0.5 + 0.45 * experts, 0.6 + 0.35 * domains
    figure = Figure(figsize=(1.4 + columns * panel_w + 0.8, 0.8 + rows * panel_h), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= layers:
            ax.set_axis_off()
            continue
        image = ax.imshow(values[index], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        label = f"layer {index}" + (f"  NMI {nmi[index]:.2f}" if nmi is not None else "")
        ax.set_title(label, fontsize=8)
        ax.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=7)
        ax.set_yticks(range(domains), domain_names if index % columns == 0 else [""] * domains, fontsize=7)
        if index // columns == rows - 1:
            ax.set_xlabel("expert", fontsize=7)
        if domains * experts <= 64:
            for d in range(domains):
                for e in range(experts):
                    share = values[index, d, e]
                    ax.text(e, d, f"{share:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if share > 0.6 else "white")
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="share of domain's tokens")
    figure.suptitle(title, fontsize=9)
    return figure
