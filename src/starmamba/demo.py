"""``starmamba demo``: STAR against ARM and training from scratch, on Fashion-MNIST, in minutes on a CPU.

Pretrains a small STAR model and finetunes it; as controls, pretrains ARM (one image per sequence,
no separator) with the same budget and finetunes it, and trains the same classifier from scratch
with the same finetuning budget. Writes a report folder: the table as Markdown and JSON, the loss
and accuracy curves and the reconstructions of both pretrained models as PNG.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from starmamba.experiments import Scale, finetune, pretrain
from starmamba.files import write_json
from starmamba.train.config import DataPath

METHODS = {
    "STAR": {},  # the paper's defaults: identity separator clusters before each image, 8 images
    "ARM": {"images_per_sequence": 1, "separator": "none"},
    "from scratch": None,
}


@dataclass
class DemoConfig:
    """Pretrain STAR and ARM, finetune both and a from-scratch control; report the table."""

    out: str = "reports/demo"
    """report folder (its runs/ subfolder keeps every run)"""
    budget: float = 1.0
    """scales the training images of every run; 1.0 takes about 11 minutes on 2 CPU cores"""
    data_path: DataPath = "fashion_mnist"
    seed: int = 0
    val_images: int = 1000
    """validation images used for top-1"""
    num_workers: int = 1
    progress: bool = True


def run_demo(cfg: DemoConfig) -> list[dict]:
    out = Path(cfg.out)
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)  # a demo always starts afresh, so that its numbers are this run's
    scale = Scale(cfg.budget, cfg.data_path, cfg.val_images, cfg.num_workers, cfg.progress)
    started = time.perf_counter()
    rows = []
    for i, (method, options) in enumerate(METHODS.items(), start=1):
        print(f"\n[{i}/{len(METHODS)}] {method}: " + ("pretrain, then finetune" if options is not None else "finetune"))
        folder = runs / method.replace(" ", "_")
        pre = pretrain(scale, folder, cfg.seed, options) if options is not None else None
        fine = finetune(scale, folder, cfg.seed, pre)
        rows.append({
            "method": method, "pretrain_seconds": pre["seconds"] if pre else None, "acc1": fine["acc1"],
            "ema_acc1": fine.get("ema_acc1"), "finetune_seconds": fine["seconds"],
            "pretrain_dir": pre["output_dir"] if pre else None, "finetune_dir": fine["output_dir"],
        })  # fmt: skip
    wall = time.perf_counter() - started
    write_report(out, rows, cfg, wall)
    return rows


def table_markdown(rows: list[dict]) -> str:
    lines = ["| method | pretrain time (s) | finetune top-1 (%) | EMA top-1 (%) |", "|---|---:|---:|---:|"]
    for row in rows:
        pre = f"{row['pretrain_seconds']:.0f}" if row["pretrain_seconds"] is not None else "-"
        ema = f"{row['ema_acc1']:.2f}" if row.get("ema_acc1") is not None else "-"
        lines.append(f"| {row['method']} | {pre} | {row['acc1']:.2f} | {ema} |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], cfg: DemoConfig, wall: float) -> None:
    from starmamba.reports import demo_figures

    table = table_markdown(rows)
    header = (
        f"# starmamba demo\n\nData: {cfg.data_path}, budget {cfg.budget}, seed {cfg.seed}; "
        f"top-1 on {cfg.val_images} validation images. Wall time {wall / 60:.1f} min.\n\n"
    )
    (out / "table.md").write_text(header + table + "\n")
    write_json(out / "table.json", {"rows": rows, "budget": cfg.budget, "seed": cfg.seed, "wall_seconds": wall})
    demo_figures(rows, out)
    print("\n" + table)
    print(f"\nreport written to {out}/ (table.md, table.json, curves.png, reconstructions.png) in {wall / 60:.1f} min")
