"""Slow end-to-end runs on the real Fashion-MNIST: the CLI chain and the demo at its smallest budget."""

import json
import re

import pytest

from starmamba.cli import main
from starmamba.data.datasets import FASHION_MNIST_DIR_ENV
from starmamba.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_cli_pretrain_finetune_evaluate_on_fashion_mnist(tmp_path, fashion_mnist_dir, capsys, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(fashion_mnist_dir))
    quiet = ["--preset", "fashion_mnist", "--epochs", "1", "--limit_val", "500", "--no_progress", "--no_tensorboard"]
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert main(["pretrain", *quiet, "--limit_train", "512", "--output_dir", str(pre)]) == 0
    assert "effective batch 64" in capsys.readouterr().out
    weights = pre / "model.safetensors"
    finetune = ["finetune", *quiet, "--limit_train", "2048", "--finetune", str(weights), "--output_dir", str(fine)]
    assert main(finetune) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(fine), "--limit_val", "500"]) == 0
    printed = capsys.readouterr().out
    top1 = float(re.search(r"top-1 ([0-9.]+)%", printed).group(1))
    records = [json.loads(line) for line in (fine / "metrics.jsonl").read_text().splitlines()]
    logged = [r["acc1"] for r in records if "acc1" in r][-1]
    assert top1 == pytest.approx(logged, abs=0.01)  # evaluate sees what the finetuning run saw
    assert top1 > 40.0  # ten classes: chance is 10%


def test_demo_at_its_smallest_budget_is_deterministic(tmp_path, fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(fashion_mnist_dir))
    tables = []
    for name in ("first", "second"):
        out = tmp_path / name
        run_demo(DemoConfig(out=str(out), budget=0.01, val_images=200, progress=False))
        for picture in ("curves.png", "reconstructions.png"):
            assert (out / picture).stat().st_size > 1000, picture
        tables.append(json.loads((out / "table.json").read_text())["rows"])
        assert "| STAR |" in (out / "table.md").read_text()
    first, second = tables
    assert [r["method"] for r in first] == ["STAR", "ARM", "from scratch"]
    assert [(r["acc1"], r["ema_acc1"]) for r in first] == [(r["acc1"], r["ema_acc1"]) for r in second]
    for row in first:
        assert 0.0 <= row["acc1"] <= 100.0
