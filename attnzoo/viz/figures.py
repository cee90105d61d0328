"""The PNG grids of ``attnzoo visualize``: matplotlib ``Figure``s (Agg, no pyplot state)
saved to memory and written atomically.

Every grid is made of fixed-size cells, so a picture's pixel size follows from its rows
and columns alone: ``grid_pixels(rows, cols, cell, header)``.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ..utils.io import atomic_write

DPI = 100
IMAGE_CELL = (2.0, 2.0)  # inches (width, height) of one image cell, its title included
IMAGE_TITLE = 0.4  # inches above each image for its title (two lines in the first row)
IMAGE_BELOW = 0.15  # inches below each image (the first row says each column's range)
HEADER = 0.5  # inches above an image grid: the figure title, and room for long column titles
BAR_CELL = (3.2, 2.0)  # one bar plot in channel_weights.png
CURVES_SIZE = (12.0, 3.5)  # curves.png: loss, accuracy, lr side by side
HEATMAP = "jet"
OVERLAY_ALPHA = 0.5


def grid_pixels(
    rows: int, cols: int, cell: tuple[float, float] = IMAGE_CELL, header: float = HEADER
) -> tuple[int, int]:
    """(width, height) in pixels of a grid of ``rows`` x ``cols`` cells under a header."""
    return round(cols * cell[0] * DPI), round((rows * cell[1] + header) * DPI)


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG bytes in memory, then replace ``path`` atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return Path(path)


def _image_grid(rows: int, cols: int, title: str) -> tuple[Figure, np.ndarray]:
    """A figure of image cells placed by hand (no layout engine: grids of a few hundred
    images would spend seconds in it); axes without ticks or frames."""
    (cw, ch), gap = IMAGE_CELL, 0.1
    width, height = cols * cw, rows * ch + HEADER
    fig = Figure(figsize=(width, height), dpi=DPI)
    axes = np.empty((rows, cols), dtype=object)
    box_h = ch - IMAGE_TITLE - IMAGE_BELOW
    for i in range(rows):
        bottom = height - HEADER - i * ch - IMAGE_TITLE - box_h
        for j in range(cols):
            rect = [(j * cw + gap / 2) / width, bottom / height, (cw - gap) / width, box_h / height]
            ax = fig.add_axes(rect)
            ax.set_axis_off()
            axes[i, j] = ax
    fig.text(0.5, 1 - 0.05 / height, title, ha="center", va="top", fontsize=10)
    return fig, axes


def _wrap(text: str, width: int = 30) -> str:
    """Break each line of a cell title to fit a 2-inch cell (30 characters at 8 pt)."""
    return "\n".join(part for line in text.split("\n") for part in textwrap.wrap(line, width))


def _show_image(ax: Any, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="nearest")


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float) -> None:
    _show_image(ax, image)
    ax.imshow(
        heat, cmap=HEATMAP, vmin=vmin, vmax=vmax, alpha=OVERLAY_ALPHA, interpolation="bilinear"
    )


@dataclass
class CamColumn:
    title: str  # the run: model+attention
    heatmaps: np.ndarray  # (N, H, W) in [0, 1]
    predicted: Sequence[int]


def _namer(class_names: Sequence[str] | None):
    """Label -> what a picture prints: the class name where the dataset has names."""
    return lambda k: class_names[int(k)] if class_names else str(int(k))


def gradcam_figure(
    images: np.ndarray,
    labels: Sequence[int],
    columns: Sequence[CamColumn],
    method: str,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Rows: images. Columns: the image, then each run's heatmap over it (HAM Fig. 5)."""
    name = _namer(class_names)
    fig, axes = _image_grid(len(images), 1 + len(columns), f"{method} at the last stage")
    for i, image in enumerate(images):
        _show_image(axes[i, 0], image)
        axes[i, 0].set_title(f"true {name(labels[i])}", fontsize=9)
        for j, col in enumerate(columns, start=1):
            _overlay(axes[i, j], image, col.heatmaps[i], 0.0, 1.0)
            right = int(col.predicted[i]) == int(labels[i])
            text = f"pred {name(col.predicted[i])}"
            if i == 0:
                text = f"{_wrap(col.title, 27)}\n{text}"
            axes[i, j].set_title(text, fontsize=9, color="black" if right else "firebrick")
    return fig


@dataclass
class MapColumn:
    title: str  # "run\nstage: map"
    maps: np.ndarray  # (N, H, W), upsampled to the image size


def attention_figure(
    images: np.ndarray,
    labels: Sequence[int],
    columns: Sequence[MapColumn],
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Rows: images. Columns: the image, then every selected map of every run.

    Each column has one colour scale over its images (its range under the first row), so
    images can be compared within a column; across columns only the shape compares."""
    title = "attention maps (last module of each stage), upsampled to the image"
    name = _namer(class_names)
    fig, axes = _image_grid(len(images), 1 + len(columns), title)
    for i, image in enumerate(images):
        _show_image(axes[i, 0], image)
        axes[i, 0].set_title(f"true {name(labels[i])}", fontsize=9)
    for j, col in enumerate(columns, start=1):
        lo, hi = float(col.maps.min()), float(col.maps.max())
        if is_constant(lo, hi):
            # A dead gate (HAM's spatial map stuck at 0.5, say): one flat colour, and said so,
            # so that it does not look like a plotting fault.
            label = f"constant map: {lo:.4g} everywhere"
            lo, hi = lo - 1.0, lo + 1.0
        else:
            label = f"range {lo:.3g} .. {hi:.3g}"
        for i, image in enumerate(images):
            _overlay(axes[i, j], image, col.maps[i], lo, hi)
        axes[0, j].set_title(_wrap(col.title), fontsize=8)
        axes[0, j].text(
            0.5, -0.02, label, transform=axes[0, j].transAxes, ha="center", va="top", fontsize=7,
        )  # fmt: skip
    return fig


def is_constant(lo: float, hi: float) -> bool:
    """A map whose values span less than float32 rounding of their size is constant."""
    return hi - lo <= 1e-6 * max(1.0, abs(lo), abs(hi))


@dataclass
class BarCell:
    title: str
    weights: np.ndarray  # (N, C)


def channel_figure(rows: Sequence[Sequence[BarCell]]) -> Figure:
    """One row per run, one bar plot per stage: the mean weight of each channel over the
    images (bars) and its min..max over the images (lines)."""
    cols = max(len(r) for r in rows)
    fig = Figure(
        figsize=(cols * BAR_CELL[0], len(rows) * BAR_CELL[1]), dpi=DPI, layout="constrained"
    )
    axes = np.asarray(fig.subplots(len(rows), cols, squeeze=False))
    for i, row in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(row):
                ax.axis("off")
                continue
            w = row[j].weights
            x = np.arange(w.shape[1])
            ax.bar(x, w.mean(axis=0), width=0.9, color="tab:blue", label="mean")
            ax.vlines(x, w.min(axis=0), w.max(axis=0), color="black", lw=0.8, label="min..max")
            ax.set_xlim(-0.5, w.shape[1] - 0.5)
            ax.set_ylim(0, max(1.0, float(w.max()) * 1.05))
            ax.set_title(row[j].title, fontsize=8)
            ax.set_xlabel(f"channel (C = {w.shape[1]})", fontsize=7)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("channel-attention weights of the last module per stage", fontsize=10)
    return fig


def curves_figure(title: str, rows: Sequence[dict]) -> Figure:
    """Loss, train and test accuracy, and learning rate over epochs (metrics.jsonl)."""
    fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]

    def series(key: str, transform=lambda v: v) -> tuple[list, list]:
        pairs = [
            (e, transform(r[key]))
            for e, r in zip(epochs, rows, strict=True)
            if r.get(key) is not None
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    ax_loss.plot(*series("train_loss"), "o-", ms=3, label="train")
    ax_loss.plot(*series("test_loss"), "o-", ms=3, label="test")
    ax_loss.set_title("loss", fontsize=9)
    ax_acc.plot(*series("train_acc"), "o-", ms=3, label="train")
    ax_acc.plot(*series("test_top1_err", lambda v: 100.0 - v), "o-", ms=3, label="test (top-1)")
    ax_acc.set_title("accuracy (%)", fontsize=9)
    ax_lr.plot(*series("lr"), "o-", ms=3, color="tab:green")
    ax_lr.set_title("learning rate", fontsize=9)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
