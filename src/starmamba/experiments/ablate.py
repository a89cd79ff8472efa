"""``starmamba ablate TABLE``: the paper's ablation Tables 1-5, rerun at an affordable scale, and our own
``decoder_context`` table (what a decoder query may attend to, which the paper leaves open).

Every row is pretrained with the same budget and data for each seed, its encoder measured by the
k-NN probe top-1 of its frozen features (the primary small-scale metric: no finetuning noise) and,
unless ``--no_finetune``, finetuned; every top-1 is on the whole validation split. The table shows
our mean +- std next to the paper's ImageNet numbers (MambaMLP-B, 200 epochs), and each row's
paired per-seed difference from the first row and, for the k-NN probe, from the paper's encoder at
random initialisation (probed with every seed: the level pretraining has to rise above). Runs are
cached by a hash of their config, so a rerun skips what has finished and rows that share a
pretraining (Table 5) pretrain once. ``--jobs`` runs several seeds/rows at once, one GPU each when there are GPUs.

The classifier reads the mean of the patch tokens by default, as ARM's finetuning recipe does;
``--readout class_token`` reads the class token instead, and ``--readout both`` runs every row with
each (``starmamba ablate 5 --readout both``: where the class token sits, read or not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import tyro

from starmamba import ops
from starmamba.experiments.recipes import ARM, Scale
from starmamba.experiments.reports import paired_difference
from starmamba.experiments.runs import finetune, knn_probe, pretrain, run_tasks
from starmamba.experiments.tables import cell, markdown_table, mean_std
from starmamba.files import write_json, write_text
from starmamba.train.config import DataPath

Readout = Literal["mean", "class_token", "both"]
READOUTS = {"mean": {"global_pool": True}, "class_token": {"global_pool": False}}
READOUT_NAMES = {"mean": "mean-of-patches readout", "class_token": "class-token readout"}


@dataclass(frozen=True)
class Row:
    """One row: how it pretrains (StarConfig overrides, on top of the paper's defaults) and finetunes.

    The paper's ablations finetune with Vim's middle class token: its Table 5 "STAR (middle)" row
    is Table 2's "Zeros" and Table 4's "8"; only the starred row there moves it to the tail. The
    paper does not say how its classifier reads out (see ``AblateConfig.readout``).
    """

    label: str
    star: dict
    paper_ft: float | None
    paper_ema: float | None
    classifier: dict = field(default_factory=lambda: {"cls_token": "middle"})
    paper_hours: float | None = None


def _zeros(images: int, **more) -> dict:
    return {"images_per_sequence": images, "separator_value": "zeros", **more}


TableName = Literal[1, 2, 3, 4, 5, "decoder_context"]
TABLES: dict[TableName, tuple[str, list[Row]]] = {
    1: ("Table 1: separator type (4 images per sequence)", [
        Row("Baseline (ARM)", ARM, 81.81, 82.15),
        Row("None", {"images_per_sequence": 4, "separator": "none"}, 78.64, 78.63),
        Row("Token", _zeros(4, separator="token"), 79.41, 79.37),
        Row("Cluster", _zeros(4), 82.15, 82.40),
    ]),
    2: ("Table 2: separator value (8 images per sequence)", [
        Row("Baseline (ARM)", ARM, 81.81, 82.15),
        Row("Zeros", _zeros(8), 81.77, 82.35),
        Row("Ones", {"separator_value": "ones"}, 81.83, 82.26),
        Row("Embeddings", {"separator_value": "embedding"}, 82.05, 82.27),
        Row("Identity", {"separator_value": "identity"}, 82.03, 82.32),
    ]),
    3: ("Table 3: separator position (8 images per sequence)", [
        Row("SC", _zeros(8, separator_position="SC"), 81.77, 82.35, paper_hours=24.6),
        Row("CS", _zeros(8, separator_position="CS"), 77.93, 77.94, paper_hours=24.6),
        Row("SCS", _zeros(8, separator_position="SCS"), 81.98, 82.33, paper_hours=31.4),
        Row("CSC", _zeros(8, separator_position="CSC"), 78.69, 78.64, paper_hours=31.4),
    ]),
    4: ("Table 4: images per sequence", [
        Row("1", _zeros(1), 81.94, 82.20),
        Row("2", _zeros(2), 81.92, 82.24),
        Row("4", _zeros(4), 82.15, 82.40),
        Row("8", _zeros(8), 81.77, 82.35),
        Row("16", _zeros(16), 81.55, 81.97),
    ]),
    5: ("Table 5: class token position (8 images per sequence)", [
        Row("STAR (middle class token)", _zeros(8), 81.77, 82.35),
        Row("STAR* (tail class token)", _zeros(8), 81.89, 82.61, classifier={"cls_token": "tail"}),
    ]),
    "decoder_context": ("Decoder context (8 images per sequence; not in the paper)", [
        Row("image", _zeros(8, decoder_context="image"), None, None),
        Row("sequence", _zeros(8, decoder_context="sequence"), None, None),
    ]),
}  # fmt: skip


@dataclass
class AblateConfig:
    """Rerun one of the paper's ablation tables over several seeds."""

    table: Annotated[TableName, tyro.conf.Positional]
    """1 type, 2 value, 3 position, 4 images per sequence, 5 class-token position, decoder_context: what a
    decoder query attends to (its own image or the whole sequence)"""
    seeds: int = 3
    budget: float = 0.5
    """scales every run's training images (0.5: about 2 minutes per row and seed on 2 CPU cores)"""
    data_path: DataPath = "fashion_mnist"
    """'fashion_mnist' or any ImageFolder root"""
    jobs: int = 1
    """runs at once (processes; one GPU each when there are GPUs)"""
    out: str = "reports/ablations"
    val_images: int | None = None
    """validation images every top-1 is measured on (None: the whole validation split)"""
    finetune: bool = True
    """also finetune every row (--no_finetune: the k-NN probe only, where the budget allows no more)"""
    progress: bool = True
    readout: Readout = "mean"
    """'mean' of the patch tokens (ARM's recipe), the 'class_token', or 'both': every row with each"""


def with_readouts(rows: list[Row], readout: Readout) -> list[Row]:
    """``rows`` finetuned with ``readout``; for 'both', each row twice, its label naming the readout."""
    if readout != "both":
        return [replace(row, classifier=row.classifier | READOUTS[readout]) for row in rows]
    return [
        replace(row, label=f"{row.label}, {READOUT_NAMES[name]}", classifier=row.classifier | options)
        for row in rows
        for name, options in READOUTS.items()
    ]


def _run_group(
    header: str, scale: Scale, root: str, seed: int, star: dict, classifiers: list[dict], with_finetune: bool = True
) -> list[dict]:
    """Pretrain and probe once, finetune every classifier variant (if ``with_finetune``); results in the order given."""
    print(f"\n{header}", flush=True)
    # The first call in a process compiles the scan kernels (later ones take a millisecond), so that no
    # row's pretraining time pays for the compilation.
    ops.warm_up()
    pre = pretrain(scale, Path(root), seed, star)
    probe = knn_probe(scale, Path(root), seed, pre, star)
    return [
        {"pre": pre, "probe": probe, "fine": finetune(scale, Path(root), seed, pre, options) if with_finetune else None}
        for options in classifiers
    ]


def run_ablation(cfg: AblateConfig) -> dict:
    title, rows = TABLES[cfg.table]
    rows = with_readouts(rows, cfg.readout)
    if cfg.readout != "both":
        title = f"{title}, {READOUT_NAMES[cfg.readout]}"
    out = Path(cfg.out)
    root = out / "runs"
    scale = Scale(cfg.budget, cfg.data_path, cfg.val_images, progress=cfg.progress and cfg.jobs == 1)
    # Rows with the same pretraining share it (Table 5); every group runs once per seed.
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(json.dumps(row.star, sort_keys=True), []).append(i)
    tasks = [(seed, members) for seed in range(cfg.seeds) for members in groups.values()]
    args = [
        (f"[{n}/{len(tasks)}] {title}: seed {seed}, rows {', '.join(rows[i].label for i in m)}", scale, str(root), seed,
         rows[m[0]].star, [rows[i].classifier for i in m], cfg.finetune)
        for n, (seed, m) in enumerate(tasks, start=1)
    ]  # fmt: skip
    outcomes = run_tasks(_run_group, args, cfg.jobs)
    per_row: list[list[dict]] = [[] for _ in rows]
    for (_, members), results in zip(tasks, outcomes, strict=True):
        for i, result in zip(members, results, strict=True):
            per_row[i].append(result)
    # What a row's k-NN top-1 means depends on where its encoder started: the paper's encoder at random
    # initialisation, probed with each seed, is the level that pretraining has to rise above.
    random_init = [knn_probe(scale, root, seed, None, {}) for seed in range(cfg.seeds)]
    report = summarise(cfg, title, rows, per_row, random_init)
    name = f"table{cfg.table}" if isinstance(cfg.table, int) else cfg.table
    write_json(out / f"{name}.json", report)
    markdown = table_markdown(report)
    write_text(out / f"{name}.md", markdown + "\n")
    print("\n" + markdown)
    return report


def summarise(
    cfg: AblateConfig, title: str, rows: list[Row], per_row: list[list[dict]], random_init: list[dict]
) -> dict:  # fmt: skip
    """The table's report: per row its runs and mean ± std per metric, with paired per-seed differences
    from the first row and (k-NN) from the random-initialisation probes ``random_init``, one per seed."""
    random_knn = [probe["acc1"] for probe in random_init]

    entries = []
    for row, results in zip(rows, per_row, strict=True):
        fine = [r["fine"] or {} for r in results]
        entries.append({
            "label": row.label, "star": row.star, "classifier": row.classifier,
            "paper_ft": row.paper_ft, "paper_ema": row.paper_ema, "paper_hours": row.paper_hours,
            "knn_acc1": mean_std([r["probe"]["acc1"] for r in results]),
            "acc1": mean_std([f.get("acc1") for f in fine]),
            "ema_acc1": mean_std([f.get("ema_acc1") for f in fine]),
            "pretrain_seconds": mean_std([r["pre"]["seconds"] for r in results]),
            "runs": [{"pretrain": r["pre"]["output_dir"], "finetune": f.get("output_dir")}
                     for r, f in zip(results, fine, strict=True)],
        })  # fmt: skip
    for entry in entries:  # seeds are paired: the same seed of every row shares data order and initialisation
        for metric in ("knn_acc1", "acc1"):
            if entry[metric] is not None:
                entry[f"{metric}_vs_first"] = paired_difference(entry[metric]["values"], entries[0][metric]["values"])
        entry["knn_acc1_vs_random_init"] = paired_difference(entry["knn_acc1"]["values"], random_knn)
    return {"table": cfg.table, "title": title, "seeds": list(range(cfg.seeds)), "budget": cfg.budget,
            "data_path": cfg.data_path, "val_images": cfg.val_images, "rows": entries,
            "random_init_knn_acc1": mean_std(random_knn),
            "random_init_runs": [probe.get("output_dir") for probe in random_init]}  # fmt: skip


def _paper(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_markdown(report: dict) -> str:
    with_time = report["table"] == 3
    first = report["rows"][0]["label"]
    columns = ["row", "paper FT", "paper EMA", "ours k-NN top-1", "vs random init", f"vs {first}", "ours top-1",
               f"vs {first}", "ours EMA top-1"]  # fmt: skip
    columns += ["paper time (h)", "ours pretrain (s)"] if with_time else []
    rows = []
    for e in report["rows"]:
        row = [e["label"], _paper(e["paper_ft"]), _paper(e["paper_ema"]), cell(e["knn_acc1"]),
               cell(e["knn_acc1_vs_random_init"], signed=True), cell(e.get("knn_acc1_vs_first"), signed=True),
               cell(e["acc1"]), cell(e.get("acc1_vs_first"), signed=True), cell(e["ema_acc1"])]  # fmt: skip
        if with_time:
            row += [f"{e['paper_hours']:.1f}", f"{e['pretrain_seconds']['mean']:.0f}"]
        rows.append(row)
    title = (
        f"**{report['title']}** — paper: ImageNet-1k, MambaMLP-B, 200 epochs. Ours: {report['data_path']}, "
        f"budget {report['budget']}, mean ± std over seeds {report['seeds']}; "
        f"k-NN: cosine k-NN probe (k=20) of the pretrained encoder; 'vs' columns: paired per-seed difference "
        "from the first row, or from the same encoder at random initialisation (k-NN top-1 "
        f"{cell(report['random_init_knn_acc1'])}), mean ± std."
    )
    return title + "\n\n" + markdown_table(columns, rows)
