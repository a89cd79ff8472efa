"""Pictures of a run: its training curves and grids of images (reconstructions); written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from starmamba.files import atomic_write

PANEL_INCHES = (4.5, 3.5)
DPI = 100
PADDING = 2  # pixels around and between the images of a grid
MARKED_POINTS = 50  # a series of at most this many points is drawn with markers
MARKED_TICKS = 8  # an axis of at most this many distinct x values has a tick at each
EVAL_SERIES = {"acc1": "top-1", "ema_acc1": "EMA top-1"}


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Draw :func:`curves_figure` of ``records`` (metrics.jsonl lines) into the PNG ``path``.

    Nothing is written when there is nothing to draw.
    """
    figure = curves_figure(records, title)
    if figure is not None:
        atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png"))


def curves_figure(records: list[dict], title: str = ""):
    """The curves ``records`` hold, side by side, as a matplotlib Figure (None when there are none).

    Panels, each where its keys appear: train ``loss`` and ``lr`` against ``step``, validation top-1
    (``acc1``, ``ema_acc1``) and ``val_loss`` against ``epoch``. Each panel is 450 x 350 pixels.
    Series of few points get markers (a short run's handful of points reads as points, not a
    stray segment), and step and epoch axes have whole-number ticks.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def series(x: str, y: str) -> tuple[list, list]:
        points = [(r[x], r[y]) for r in records if x in r and y in r]
        return [p[0] for p in points], [p[1] for p in points]

    present = {key for record in records for key in record}
    panels: list[tuple[str, str, list[tuple[str, tuple[list, list]]]]] = []
    for key, name in (("loss", "train loss"), ("lr", "learning rate")):
        if key in present:
            panels.append((name, "step", [(key, series("step", key))]))
    top1 = [(label, series("epoch", key)) for key, label in EVAL_SERIES.items() if key in present]
    if top1:
        panels.append(("validation top-1 (%)", "epoch", top1))
    if "val_loss" in present:
        panels.append(("validation loss", "epoch", [("val_loss", series("epoch", "val_loss"))]))
    if not panels:
        return None

    # Figure with its own Agg canvas, not pyplot: no global backend switch, no figures left open.
    figure = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    row = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (name, x_label, lines) in zip(row, panels, strict=True):
        for label, (xs, ys) in lines:
            marked = x_label == "epoch" or len(xs) <= MARKED_POINTS
            axes.plot(xs, ys, label=label, marker="o" if marked else None, markersize=4)
        axes.set(title=name, xlabel=x_label)
        shown = sorted({x for _, (xs, _) in lines for x in xs})
        if len(shown) <= MARKED_TICKS:  # a few points: a tick at each (one point would get fractions)
            axes.set_xticks(shown)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len(lines) > 1:
            axes.legend()
    if title:
        figure.suptitle(title)
    return figure


def save_image_grid(images: Tensor, path: Path, nrow: int) -> None:
    """Save images (N, 3 or 1, H, W) with values in [0, 1] as one PNG, ``nrow`` images per row.

    The images are separated and surrounded by 2 white pixels.
    """
    path = Path(path)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"expected images (N, 3 or 1, H, W) with N > 0, got shape {tuple(images.shape)}")
    count, _, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    canvas = torch.full(
        (3, rows * (height + PADDING) + PADDING, columns * (width + PADDING) + PADDING),
        255,
        dtype=torch.uint8,
    )
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    for index, image in enumerate(pixels):
        top = PADDING + (index // columns) * (height + PADDING)
        left = PADDING + (index % columns) * (width + PADDING)
        canvas[:, top : top + height, left : left + width] = image
    image = Image.fromarray(canvas.permute(1, 2, 0).contiguous().numpy())
    atomic_write(path, lambda temp: image.save(temp, format="PNG"))
