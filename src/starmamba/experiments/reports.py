"""The demo's and ablations' reports: paired comparisons between methods, and figures drawn from the
runs' metrics.jsonl and images."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from starmamba.files import atomic_write
from starmamba.train.metrics import read_metrics


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """``a`` minus ``b``, seed by seed (the two lists in the same seed order).

    Returns {"differences", "mean", "std" (sample std of the differences; None for one seed), "seeds"}.
    Seeds are paired (same data order, same initialisation of shared parts), so the spread of the
    differences, not of each method on its own, is the noise a comparison has to beat.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired results need the same, non-zero number of seeds; got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b, strict=True)]
    std = statistics.stdev(differences) if len(differences) > 1 else None
    return {"differences": differences, "mean": statistics.fmean(differences), "std": std, "seeds": len(a)}


def noise_verdict(name: str, metric: str, diff: dict) -> str:
    """One line saying whether a :func:`paired_difference` exceeds its measured noise (|mean| > paired std)."""
    head = f"{name}, {metric}: {diff['mean']:+.2f} points"
    if diff["std"] is None:
        return f"{head} (1 seed: noise unmeasured; run --seeds 2 or more to tell)"
    spread = f" ± {diff['std']:.2f} (paired std over {diff['seeds']} seeds)"
    if abs(diff["mean"]) > diff["std"]:
        return f"{head}{spread}: larger than the noise"
    return f"{head}{spread}: within the noise"


def demo_figures(rows: list[dict], out: Path) -> None:
    """curves.png (pretraining loss; finetuning loss, with the final top-1, per method) and reconstructions.png.

    ``rows`` name each method and its run folders (``pretrain_dir`` may be None). The small-scale runs
    measure top-1 once, at their end, so the finetuning panel follows the training loss.
    """
    # Imported here: matplotlib is slow to import, and its backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pre, ax_fine) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        method = row["method"]
        if row["pretrain_dir"]:
            records = [r for r in read_metrics(Path(row["pretrain_dir"]) / "metrics.jsonl") if "loss" in r]
            ax_pre.plot([r["step"] for r in records], [r["loss"] for r in records], label=method)
        records = read_metrics(Path(row["finetune_dir"]) / "metrics.jsonl")
        losses = [r for r in records if "loss" in r]
        top1 = [r["acc1"] for r in records if "acc1" in r]
        label = method + (f" (top-1 {top1[-1]:.1f}%)" if top1 else "")
        ax_fine.plot([r["step"] for r in losses], [r["loss"] for r in losses], marker=".", label=label)
    ax_pre.set(title="pretraining loss (norm-pixel MSE)", xlabel="step", ylabel="loss")
    ax_fine.set(title="finetuning on all labels: training loss", xlabel="step", ylabel="cross-entropy")
    for ax in (ax_pre, ax_fine):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out / "curves.png", lambda temp: fig.savefig(temp, dpi=100, format="png"))
    plt.close(fig)
    stack_images(
        [(r["method"], Path(r["pretrain_dir"]) / "reconstructions.png") for r in rows if r["pretrain_dir"]],
        out / "reconstructions.png",
    )


def stack_images(labelled: list[tuple[str, Path]], path: Path, scale: int = 3) -> None:
    """Stack the images that exist vertically, each under its label, enlarged ``scale`` times."""
    panels = []
    for label, image_path in labelled:
        if not image_path.exists():
            continue
        image = Image.open(image_path).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        panel = Image.new("RGB", (image.width, image.height + 16), "white")
        ImageDraw.Draw(panel).text((2, 2), f"{label}: originals (top), predictions (bottom)", fill="black")
        panel.paste(image, (0, 16))
        panels.append(panel)
    if not panels:
        return
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    atomic_write(path, lambda temp: canvas.save(temp, format="PNG"))
