"""``starmamba demo``: STAR against ARM and no pretraining, on Fashion-MNIST, in minutes on a CPU.

Pretrains a small STAR model; as controls, pretrains ARM (one image per sequence, no separator) with
the same budget, and uses no pretraining at all. Each method is measured on the whole validation
split: the k-NN probe top-1 of its encoder's frozen features (for "no pretraining", the same encoder
at random initialisation), the top-1 after finetuning on the full-label budget and, when
``labels_per_class`` is set, after finetuning on that many labels per class. With ``--seeds`` >= 2
every comparison is the paired per-seed difference, mean ± std, and the report says whether it
exceeds that noise. Writes a report folder: the table as Markdown and JSON, loss and accuracy curves
and the reconstructions.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from starmamba import ops
from starmamba.checks import check_positive
from starmamba.data import build_dataset
from starmamba.experiments import reports
from starmamba.experiments.recipes import (
    ARM,
    DEMO_BUDGET,
    DEMO_PRETRAIN_BUDGET,
    EPOCHS,
    WITHOUT_EMA,
    Scale,
    all_labels_options,
    low_label_options,
)
from starmamba.experiments.runs import finetune, knn_probe, pretrain, run_tasks
from starmamba.experiments.tables import cell, markdown_table, mean_std
from starmamba.files import write_json
from starmamba.models import StarConfig
from starmamba.train.config import DataPath

METHODS = {
    "STAR": {},  # the paper's defaults: identity separator clusters before each image, 8 images
    "ARM": ARM,
    "from scratch": None,
}
METRICS = {
    "knn_acc1": "k-NN probe top-1",
    "low_label_acc1": "low-label finetune top-1",
    "acc1": "full-label finetune top-1",
}
COMPARISONS = (("STAR", "ARM"), ("STAR", "from scratch"), ("ARM", "from scratch"))
ONE_SEED = (
    "One seed measures no noise. What it can show: a pretrained encoder several k-NN points above the random one "
    "(the paired spread of k-NN differences over 3 seeds was 0.5-1.6 points in docs/ablations/). What it cannot: "
    "differences of a point or two, which is all the finetuning columns differ by at this budget; run --seeds 3."
)


@dataclass
class DemoConfig:
    """Pretrain STAR and ARM; probe and finetune both and a no-pretraining control; report the table."""

    out: str = "reports/demo"
    """report folder (its runs/ subfolder keeps every run)"""
    budget: float = DEMO_BUDGET
    """scales the finetuning and probing images of every run"""
    pretrain_budget: float | None = DEMO_PRETRAIN_BUDGET
    """scales the pretraining images (None: ``budget``); the default demo spends its minutes here, where a
    short run needs them for its pretrained encoders to rise clearly above the random one"""
    data_path: DataPath = "fashion_mnist"
    seed: int = 0
    """the first seed"""
    seeds: int = 1
    """seeds seed, seed + 1, ...: every method runs with each; 2 or more measure the noise of each comparison"""
    labels_per_class: int | None = None
    """labels per class of a low-label finetuning of every method (None: none; the evidence run uses
    100)"""
    finetune_epochs: int | None = None
    """the full-label finetuning's passes over the whole training set (None: over the budget's images, a
    subset); the low-label finetuning keeps the budget's number of steps either way"""
    val_images: int | None = None
    """validation images every top-1 is measured on (None: the whole validation split)"""
    num_workers: int = 1
    jobs: int = 1
    """runs at once (processes sharing the CPU cores, or one GPU each); more than 1 for long runs of several
    seeds: on 2 CPU cores 2 jobs do about 1.5x the work per hour, and every time is measured sharing the cores"""
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive("budget", self.budget)
        if self.pretrain_budget is not None:
            check_positive("pretrain_budget", self.pretrain_budget)
        check_positive("jobs", self.jobs)
        check_positive("seeds", self.seeds)
        if self.labels_per_class is not None:
            check_positive("labels_per_class", self.labels_per_class)
        if self.finetune_epochs is not None:
            check_positive("finetune_epochs", self.finetune_epochs)
        if self.val_images is not None:
            check_positive("val_images", self.val_images)


def run_demo(cfg: DemoConfig) -> list[dict]:
    """Every (method, seed) run; writes the report. Rows are in method order, then seed order."""
    out = Path(cfg.out)
    runs = out / "runs"
    if runs.exists():
        shutil.rmtree(runs)  # a demo always starts afresh, so that its numbers are this run's
    scale = Scale(
        cfg.budget, cfg.data_path, cfg.val_images, cfg.num_workers, cfg.progress and cfg.jobs == 1, cfg.pretrain_budget
    )
    low_label = None
    if cfg.labels_per_class is not None:
        classes = build_dataset(cfg.data_path, "train").info.num_classes
        low_label = low_label_options(scale, classes, cfg.labels_per_class)
    all_labels = {} if cfg.finetune_epochs is None else all_labels_options(cfg.finetune_epochs)
    started = time.perf_counter()
    # Seed by seed, so that every finished seed is a complete, paired comparison of the methods.
    order = [(seed, method) for seed in range(cfg.seed, cfg.seed + cfg.seeds) for method in METHODS]
    tasks = [
        (f"[{n}/{len(order)}] {method}, seed {seed}", scale, str(runs), method, seed, low_label, all_labels)
        for n, (seed, method) in enumerate(order, start=1)
    ]
    rows = run_tasks(_run_method, tasks, cfg.jobs)
    wall = time.perf_counter() - started
    rows.sort(key=lambda row: list(METHODS).index(row["method"]))  # stable: seed order within a method
    write_report(out, rows, cfg, wall)
    return rows


def _run_method(
    header: str, scale: Scale, runs: str, method: str, seed: int, low_label: dict | None, all_labels: dict
) -> dict:
    """One method with one seed: pretrain (unless "from scratch"), probe, finetune with few labels (``low_label``
    overrides; skipped when None) and with all labels (``all_labels`` overrides)."""
    ops.warm_up()  # the scan kernels' first call compiles them: not part of the first method's pretraining time
    options = METHODS[method]
    steps = "pretrain, probe, finetune" if options is not None else "probe the random encoder, finetune"
    print(f"\n{header}: {steps}", flush=True)
    folder = Path(runs) / method.replace(" ", "_")
    pre = pretrain(scale, folder, seed, options) if options is not None else None
    probe = knn_probe(scale, folder, seed, pre, options if options is not None else METHODS["STAR"])
    low = finetune(scale, folder, seed, pre, overrides=low_label | WITHOUT_EMA) if low_label is not None else {}
    fine = finetune(scale, folder, seed, pre, overrides=all_labels | WITHOUT_EMA)
    return {
        "method": method, "seed": seed, "knn_acc1": probe["acc1"], "low_label_acc1": low.get("acc1"),
        "acc1": fine["acc1"], "pretrain_seconds": pre["seconds"] if pre else None,
        "pretrain_ms_per_image": 1000 * pre["seconds"] / (scale.pretrain_images * EPOCHS) if pre else None,
        "finetune_seconds": fine["seconds"], "pretrain_dir": pre["output_dir"] if pre else None,
        "finetune_dir": fine["output_dir"], "low_label_dir": low.get("output_dir"),
    }  # fmt: skip


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per method and metric: {"mean", "std" (None for one seed), "values"} over its seeds."""
    summary = {}
    for method in METHODS:
        mine = [row for row in rows if row["method"] == method]
        summary[method] = {}
        for metric in (*METRICS, "pretrain_seconds", "pretrain_ms_per_image"):
            values = [row[metric] for row in mine if row[metric] is not None]
            if values:
                summary[method][metric] = mean_std(values)
    return summary


def comparisons(rows: list[dict]) -> list[dict]:
    """Every comparison of :data:`COMPARISONS` on every metric: the paired per-seed difference and its verdict."""
    result = []
    for a, b in COMPARISONS:
        for metric, name in METRICS.items():
            if any(row[metric] is None for row in rows):
                continue
            by_seed = {m: {row["seed"]: row[metric] for row in rows if row["method"] == m} for m in (a, b)}
            seeds = sorted(by_seed[a])
            diff = reports.paired_difference([by_seed[a][s] for s in seeds], [by_seed[b][s] for s in seeds])
            result.append(
                {"a": a, "b": b, "metric": metric, **diff, "verdict": reports.noise_verdict(f"{a} - {b}", name, diff)}
            )
    return result


def table_markdown(summary: dict[str, dict], labels_per_class: int | None) -> str:
    metrics = [metric for metric in METRICS if metric != "low_label_acc1" or labels_per_class is not None]
    names = {"knn_acc1": "k-NN probe top-1 (%)", "acc1": "finetune top-1, all labels (%)",
             "low_label_acc1": f"finetune top-1, {labels_per_class} labels/class (%)"}  # fmt: skip
    columns = ["method", "pretrain time (s)", "pretrain ms/image", *(names[m] for m in metrics)]
    rows = [
        [method, cell(stats.get("pretrain_seconds"), 0), cell(stats.get("pretrain_ms_per_image"), 1),
         *(cell(stats.get(metric)) for metric in metrics)]
        for method, stats in summary.items()
    ]  # fmt: skip
    return markdown_table(columns, rows)


def write_report(out: Path, rows: list[dict], cfg: DemoConfig, wall: float) -> None:
    summary = summarise(rows)
    compared = comparisons(rows)
    table = table_markdown(summary, cfg.labels_per_class)
    verdicts = "\n".join(f"- {c['verdict']}" for c in compared)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    val = "the whole validation split" if cfg.val_images is None else f"{cfg.val_images} validation images"
    budget = f"budget {cfg.budget}" + (
        "" if cfg.pretrain_budget is None else f", pretraining budget {cfg.pretrain_budget}"
    )
    budget += "" if cfg.finetune_epochs is None else f", all labels x {cfg.finetune_epochs}"
    header = (
        f"# starmamba demo\n\nData: {cfg.data_path}, {budget}, seeds {seeds}; every top-1 on {val}"
        f" (mean ± std over seeds). Wall time {wall / 60:.1f} min.\n\n"
    )
    comparison_text = "## Comparisons (paired per seed)\n\n" + verdicts + (f"\n\n{ONE_SEED}" if cfg.seeds == 1 else "")
    (out / "table.md").write_text(header + table + "\n\n" + comparison_text + "\n")
    write_json(out / "table.json", {
        "rows": rows, "summary": summary, "comparisons": compared, "budget": cfg.budget,
        "pretrain_budget": cfg.pretrain_budget, "decoder_context": StarConfig().decoder_context, "seeds": seeds,
        "finetune_epochs": cfg.finetune_epochs, "labels_per_class": cfg.labels_per_class, "val_images": cfg.val_images,
        "wall_seconds": wall,
    })  # fmt: skip
    reports.demo_figures([row for row in rows if row["seed"] == cfg.seed], out)
    print("\n" + table + "\n\n" + verdicts + (f"\n\n{ONE_SEED}" if cfg.seeds == 1 else ""))
    print(f"\nreport written to {out}/ (table.md, table.json, curves.png, reconstructions.png) in {wall / 60:.1f} min")
