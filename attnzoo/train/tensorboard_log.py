"""TensorBoard backend of ``--log tensorboard``: RUN_DIR/tensorboard/ (docs/logging.md).

Written with ``torch.utils.tensorboard.SummaryWriter``; needs the ``tensorboard`` package
(``pip install 'attnzoo[tensorboard]'``). The step of everything is the epoch number, as
in metrics.jsonl (1 for the first epoch).

- Scalars, every epoch: each number of the epoch's metrics.jsonl row, so that whatever the
  loop records is shown and with the same value (TensorBoard keeps float32). Tags come
  from ``scalar_tag``: ``train_loss`` -> ``train/loss``, ``test_top1_err`` ->
  ``test/top1_err``, ``lr`` -> ``optim/lr``, ``images_per_s`` and ``*_time`` ->
  ``speed/...``, anything else -> ``run/<key>``.
- Figures, every ``log_figures_every`` epochs and after the last epoch (0: never): the
  pictures of ``attnzoo visualize`` (attnzoo/viz) for the model as it is at that epoch, on
  ``FIGURE_IMAGES`` seeded test images: ``figures/gradcam``, ``figures/attention_maps``
  and ``figures/channel_weights``. A model without spatial maps or channel weights skips
  those with a one-time note; a dataset read from folders (imagenet) skips figures.

Resume: the writer is opened at the first epoch this process logs, with ``purge_step`` set
to it, so TensorBoard hides what an earlier process logged for that epoch and later ones
(an epoch logged just before a crash and trained again) instead of showing it twice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.io import describe_os_error
from .checkpoint import RunError
from .config import TrainConfig

LOG_DIR = "tensorboard"  # under the run directory
FIGURE_IMAGES = 4  # test images per figure: a few rows keep each epoch's figures cheap
FIGURE_SEED = 0  # which test images (the same at every epoch, so figures compare)
INSTALL = "pip install 'attnzoo[tensorboard]'"
SECTIONS = ("train", "test")  # row keys "<section>_<name>" -> tag "<section>/<name>"


def summary_writer_class() -> type:
    """``SummaryWriter``, or a RunError saying how to install the package it needs."""
    try:
        import tensorboard  # noqa: F401  (torch's wrapper checks for it only when first imported)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise RunError(
            f"--log tensorboard needs the tensorboard package ({' '.join(str(e).split())}); "
            f"install it with: {INSTALL}"
        ) from e
    return SummaryWriter


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl field (see the module docstring)."""
    section, _, name = key.partition("_")
    if name and section in SECTIONS:
        return f"{section}/{name}"
    if key == "lr":
        return "optim/lr"
    if key == "images_per_s" or key.endswith("_time"):
        return f"speed/{key}"
    return f"run/{key}"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers by tag (``epoch`` is the step, not a scalar; flags and text skip)."""
    return {
        scalar_tag(key): float(value)
        for key, value in row.items()
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def model_figures(
    model: nn.Module,
    data: Any,
    title: str,
    count: int = FIGURE_IMAGES,
    seed: int = FIGURE_SEED,
) -> tuple[dict[str, Any], list[str]]:
    """``attnzoo visualize``'s Grad-CAM, attention-map and channel-weight figures of one
    model on ``count`` seeded test images of ``data``: ``({name: Figure}, [notes])``.

    Works on a copy of ``model`` in eval mode, with the RNG state restored afterwards, so
    the model being trained (its mode, gradients, DDP hooks) and the run's exactness are
    untouched.
    """
    from ..data.datasets import ImageDataset
    from ..viz import normalise, pick_images
    from ..viz.figures import (
        BarCell,
        CamColumn,
        MapColumn,
        attention_figure,
        channel_figure,
        gradcam_figure,
    )
    from ..viz.gradcam import grad_cam, last_stage
    from ..viz.maps import read_attention, upsample

    if not isinstance(data, ImageDataset):
        return {}, [f"figures need an in-memory dataset (not {type(data).__name__}); skipped"]
    indices = pick_images(data, min(count, len(data.test.labels)), seed)
    pictures = data.test.images[indices]
    labels = [int(v) for v in data.test.labels[indices]]
    x = normalise(data, pictures).to(next(model.parameters()).device)
    size = tuple(pictures.shape[1:3])
    names = getattr(data, "classes", None)
    figures: dict[str, Any] = {}
    notes: list[str] = []
    model = copy.deepcopy(model).float().eval()
    with torch.random.fork_rng(devices=[]):
        readout = read_attention(model, x)
        predicted = [int(v) for v in readout.logits.argmax(dim=1)]
        try:
            last_stage(model)
        except ValueError as e:
            notes.append(f"no Grad-CAM: {e}")
        else:
            heat = grad_cam(model, x, labels)
            column = CamColumn(title, heat, predicted)
            figures["gradcam"] = gradcam_figure(
                pictures, labels, [column], "Grad-CAM of the true class", names
            )
    if readout.spatial:
        columns = [
            MapColumn(f"{m.stage or m.module}: {m.name}", upsample(m.values, size).numpy())
            for m in readout.spatial
        ]
        figures["attention_maps"] = attention_figure(pictures, labels, columns, names)
    else:
        notes.append(f"{title} has no attention module with a spatial map: no attention_maps")
    if readout.channel:
        cells = [BarCell(w.stage or w.module, w.values.numpy()) for w in readout.channel]
        figures["channel_weights"] = channel_figure([cells])
    else:
        notes.append(f"{title} has no channel attention: no channel_weights")
    return figures, notes


def figure_pixels(fig: Any) -> np.ndarray:
    """A matplotlib Figure rendered to (H, W, 3) uint8, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class TensorBoardLogger:
    """Writes one run's scalars and figures to ``out/tensorboard`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, out: Path, data: Any = None) -> None:
        self.cfg = cfg
        self.dir = Path(out) / LOG_DIR
        self.data = data
        self.writer: Any = None
        self.noted: set[str] = set()
        self.title = f"{cfg.model}+{cfg.attention or 'none'}"

    def _open(self, epoch: int) -> Any:
        writer_class = summary_writer_class()
        try:
            # purge_step: TensorBoard drops what earlier processes logged from ``epoch`` on.
            return writer_class(log_dir=str(self.dir), purge_step=epoch)
        except OSError as e:
            raise RunError(f"cannot write {self.dir}: {describe_os_error(e)}") from e

    def wants_figures(self, epoch: int) -> bool:
        every = self.cfg.log_figures_every
        return bool(every) and (epoch % every == 0 or epoch == self.cfg.epochs)

    def epoch_end(
        self, row: dict[str, Any], model: nn.Module, log: Callable[[str], None] = print
    ) -> None:
        epoch = int(row["epoch"])
        if self.writer is None:
            self.writer = self._open(epoch)
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, epoch)
        if self.wants_figures(epoch) and self.data is not None:
            self._figures(model, epoch, log)
        self.writer.flush()

    def _figures(self, model: nn.Module, epoch: int, log: Callable[[str], None]) -> None:
        try:
            figures, notes = model_figures(model, self.data, self.title)
            for name, fig in figures.items():
                pixels = figure_pixels(fig)
                self.writer.add_image(f"figures/{name}", pixels, epoch, dataformats="HWC")
        except Exception as e:  # a picture is not worth the run: say so and train on
            notes = [f"figures of epoch {epoch} failed ({type(e).__name__}: {e}); training goes on"]
        for note in notes:
            if note not in self.noted:
                self.noted.add(note)
                log(f"note: tensorboard: {note}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
