"""Pictures of a run: its training curves and its reconstructions, as labelled figures; written atomically."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from starmamba.files import atomic_write

PANEL_INCHES = (4.5, 3.5)
DPI = 100
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
    # Imported here, as in every drawing function: matplotlib is slow to import and only drawing needs it.
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


def save_reconstructions(inputs: Tensor, outputs: Tensor, path: Path, title: str = "") -> None:
    """Save :func:`reconstruction_figure` as the PNG ``path``."""
    figure = reconstruction_figure(inputs, outputs, title)
    atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png"))


def reconstruction_figure(inputs: Tensor, outputs: Tensor, title: str = ""):
    """Images over their reconstructions, two labelled rows of N panels, as a matplotlib Figure.

    ``inputs`` and ``outputs`` are (N, 3 or 1, H, W) with values in [0, 1] (clamped). Small images
    are drawn with nearest-neighbour scaling, so their pixels stay visible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if inputs.shape != outputs.shape or inputs.ndim != 4 or inputs.shape[1] not in (1, 3) or len(inputs) == 0:
        raise ValueError(
            f"expected inputs and outputs of one shape (N, 3 or 1, H, W) with N > 0, got {tuple(inputs.shape)} "
            f"and {tuple(outputs.shape)}"
        )
    count = len(inputs)
    figure = Figure(figsize=(max(1.2 * count, 4.0), 3.0), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, count, squeeze=False)
    for row, (label, images) in enumerate((("input", inputs), ("reconstruction", outputs))):
        pixels = images.detach().float().cpu().clamp(0, 1).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        for column, image in enumerate(pixels):
            axes = grid[row][column]
            axes.imshow(image, interpolation="nearest", vmin=0.0, vmax=1.0)
            axes.set_xticks([])
            axes.set_yticks([])
        grid[row][0].set_ylabel(label)
    if title:
        figure.suptitle(title)
    return figure
