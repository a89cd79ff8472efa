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
TARGET_GROUPS = {"separator": "separators", "first_cluster": "first clusters", "cluster": "other clusters"}


def plot_curves(records: list[dict], path: Path, title: str = "") -> None:
    """Draw :func:`curves_figure` of ``records`` (metrics.jsonl lines) into the PNG ``path``.

    Nothing is written when there is nothing to draw.
    """
    figure = curves_figure(records, title)
    if figure is not None:
        atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png"))


def curves_figure(records: list[dict], title: str = ""):
    """The curves ``records`` hold, side by side, as a matplotlib Figure (None when there are none).

    Panels, each where its keys appear: train ``loss`` and ``lr`` against ``step``, the training loss
    of each target group (``loss_<group>``, solid) over its floor (``floor_<group>``, dashed: the loss
    of predicting the patch mean) against ``step``, validation top-1 (``acc1``, ``ema_acc1``) and
    ``val_loss`` against ``epoch``. Each panel is 450 x 350 pixels.
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
    groups = [(group, label) for group, label in TARGET_GROUPS.items() if f"loss_{group}" in present]
    if groups:
        lines = []
        for group, label in groups:
            lines += [(label, series("step", f"loss_{group}")), (f"{label}: floor", series("step", f"floor_{group}"))]
        panels.append(("loss by target group (dashed: floor)", "step", lines))
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
            floor = label.endswith(": floor")  # drawn dashed in the colour of the loss before it
            style = {"linestyle": "--", "color": axes.lines[-1].get_color()} if floor and axes.lines else {}
            axes.plot(xs, ys, label=None if floor else label, marker="o" if marked and not floor else None,
                      markersize=4, **style)  # fmt: skip
        axes.set(title=name, xlabel=x_label)
        shown = sorted({x for _, (xs, _) in lines for x in xs})
        if len(shown) <= MARKED_TICKS:  # a few points: a tick at each (one point would get fractions)
            axes.set_xticks(shown)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if len([label for label, _ in lines if not label.endswith(": floor")]) > 1:
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


def sequence_figure(layout):
    """A packed STAR sequence as a matplotlib Figure: its units as a strip of tokens (separators grey,
    each image's clusters in one colour, lighter by cluster), and the decoder's attention mask under
    each ``decoder_context`` (queries down, encoder tokens across; dark where a query may attend)."""
    import dataclasses

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    clusters = layout.cluster_grid[0] * layout.cluster_grid[1]
    colours = []
    for unit in layout.encoder_units:
        if unit.kind == "separator":
            colour = np.array([0.55, 0.55, 0.55])
        else:
            shade = 0.55 * unit.cluster / max(clusters - 1, 1)
            colour = np.array(to_rgb(palette[unit.image % len(palette)])) * (1 - shade) + shade
        colours += [colour] * unit.num_tokens
    figure = Figure(figsize=(11, 6.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, height_ratios=[1, 6])
    strip = figure.add_subplot(grid[0, :])
    strip.imshow(np.stack(colours)[None], aspect="auto", interpolation="nearest")
    start = 0
    for unit in layout.encoder_units:
        name = "S" if unit.kind == "separator" else f"C{unit.cluster}"
        strip.text(start + unit.num_tokens / 2 - 0.5, 0, name, ha="center", va="center", fontsize=7)
        start += unit.num_tokens
    strip.set(yticks=[], xlabel="encoder tokens, in scan order",
              title=f"{layout.images_per_sequence} images per sequence, {layout.num_tokens} tokens")  # fmt: skip
    for column, context in enumerate(("sequence", "image")):
        axes = figure.add_subplot(grid[1, column])
        mask = dataclasses.replace(layout, decoder_context=context).decoder_mask
        axes.imshow(mask.numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6)
        axes.set(title=f'decoder_context="{context}"', xlabel="encoder tokens (keys)", ylabel="queries (targets)")
    return figure


def save_sequence_figure(layout, path: Path) -> None:
    """Save :func:`sequence_figure` of ``layout`` as the PNG ``path``."""
    figure = sequence_figure(layout)
    atomic_write(Path(path), lambda temp: figure.savefig(temp, format="png"))
