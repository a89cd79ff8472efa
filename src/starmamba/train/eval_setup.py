"""What evaluating a classifier and probing frozen features share: how a checkpoint's images are seen."""

from __future__ import annotations

import json
from pathlib import Path

from starmamba.train.config import EvaluateConfig


def run_eval_options(checkpoint: Path) -> dict:
    """How the finetuning run evaluated, read from the config.json beside its weights.

    ``{"crop_pct", "resize"}``; without a config.json (e.g. ARM's .pth): ARM's 0.875 and 'square'.
    Runs written before ``eval_resize`` existed resized the shorter side. A folder of ``starmamba export``
    records the run's crop_pct (in its ``pretrained_cfg``) but not its resize: finetuning's default, 'square'.
    """
    config = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not config.is_file():
        return {"crop_pct": 0.875, "resize": "square"}
    saved = json.loads(config.read_text())
    if "pretrained_cfg" in saved:  # a folder of `starmamba export`: its crop, and finetuning's default resize
        return {"crop_pct": float(saved["pretrained_cfg"].get("crop_pct", 0.875)), "resize": "square"}
    return {"crop_pct": float(saved.get("crop_pct", 0.875)), "resize": saved.get("eval_resize", "shorter")}


def eval_options(cfg: EvaluateConfig) -> dict:
    """``{"crop_pct", "resize"}`` of the evaluation transform: the checkpoint's run's own unless ``cfg`` gives them."""
    options = run_eval_options(Path(cfg.checkpoint))
    options |= {"crop_pct": cfg.crop_pct} if cfg.crop_pct is not None else {}
    options |= {"resize": cfg.eval_resize} if cfg.eval_resize is not None else {}
    return options
