"""The demo's protocol with training replaced by known numbers: rows, means over seeds, paired verdicts."""

import json

import pytest

import starmamba.ops
from starmamba.experiments import demo, reports


@pytest.fixture
def fake_runs(monkeypatch):
    """Per method a known top-1 for each metric and seed; records what each run was asked for."""
    calls = []
    base = {"STAR": 80.0, "ARM": 78.0, "from scratch": 70.0}

    def method_of(root):
        return root.name.replace("_", " ")

    def pretrain(scale, root, seed, options):
        calls.append(("pretrain", method_of(root), seed, scale.pretrain_images, scale.images(8192)))
        return {"seconds": 12.0, "output_dir": f"{root}/pre-{seed}"}

    def knn_probe(scale, root, seed, pre, options):
        calls.append(("probe", method_of(root), seed, pre is not None, json.dumps(options, sort_keys=True)))
        return {"acc1": base[method_of(root)] + seed}  # seed moves every method alike: paired std 0

    def finetune(scale, root, seed, pre, overrides=None):
        low = "labels_per_class" in overrides
        size = (overrides.get("limit_train", "budget"), overrides.get("epochs"))
        calls.append(("finetune", method_of(root), seed, low, overrides["ema_decay"], size))
        jitter = {("STAR", 0): 0.0, ("STAR", 1): 2.0}.get((method_of(root), seed), 0.0)
        acc = base[method_of(root)] + (-10.0 if low else 5.0) + jitter
        return {"acc1": acc, "ema_acc1": acc + 0.5, "seconds": 3.0, "output_dir": f"{root}/fine-{seed}-{low}"}

    for name, fake in (("pretrain", pretrain), ("knn_probe", knn_probe), ("finetune", finetune)):
        monkeypatch.setattr(demo, name, fake)
    monkeypatch.setattr(reports, "demo_figures", lambda rows, out: calls.append(("figures", len(rows))))
    monkeypatch.setattr(starmamba.ops, "warm_up", lambda: calls.append(("warm_up",)))
    return calls


def test_demo_reports_three_metrics_per_method_and_paired_verdicts(tmp_path, fake_runs):
    config = demo.DemoConfig(out=str(tmp_path), seeds=2, data_path="synthetic", labels_per_class=100, progress=False)
    rows = demo.run_demo(config)
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("STAR", "ARM", "from scratch") for s in (0, 1)]
    # "no pretraining" is probed at random initialisation, with STAR's encoder (the paper's defaults)
    probes = [c for c in fake_runs if c[0] == "probe"]
    assert [(c[1], c[3], c[4]) for c in probes if c[2] == 0] == [
        ("STAR", True, "{}"), ("ARM", True, json.dumps({"images_per_sequence": 1, "separator": "none"},
                                                       sort_keys=True)), ("from scratch", False, "{}")
    ]  # fmt: skip
    assert sum(1 for c in fake_runs if c[0] == "finetune" and c[3]) == 6  # one low-label run per method and seed
    assert {c[4] for c in fake_runs if c[0] == "finetune"} == {None}  # no EMA copy: its top-1 is not reported
    assert fake_runs[0] == ("warm_up",)  # the kernels compile before the first pretraining is timed
    report = json.loads((tmp_path / "table.json").read_text())
    star = report["summary"]["STAR"]
    assert star["knn_acc1"] == {"mean": 80.5, "std": pytest.approx(0.5**0.5), "values": [80.0, 81.0]}
    assert star["acc1"]["values"] == [85.0, 87.0] and star["low_label_acc1"]["values"] == [70.0, 72.0]
    assert star["pretrain_ms_per_image"]["mean"] > 0 and "pretrain_seconds" not in report["summary"]["from scratch"]
    by_key = {(c["a"], c["b"], c["metric"]): c for c in report["comparisons"]}
    knn = by_key[("STAR", "ARM", "knn_acc1")]
    assert knn["differences"] == [2.0, 2.0] and knn["std"] == 0.0
    full = by_key[("STAR", "ARM", "acc1")]  # 85 - 83, 87 - 83
    assert full["differences"] == [2.0, 4.0] and full["mean"] == 3.0 and full["std"] == pytest.approx(2**0.5)
    text = (tmp_path / "table.md").read_text()
    assert "STAR - ARM, k-NN probe top-1: +2.00 points ± 0.00 (paired std over 2 seeds): larger than the noise" in text
    assert "STAR - ARM, full-label finetune top-1: +3.00 points ± 1.41" in text
    assert demo.ONE_SEED not in text  # two seeds measure the noise themselves
    assert "| STAR | 12 ± 0 |" in text
    assert "| 80.50 ± 0.71 | 71.00 ± 1.41 | 86.00 ± 1.41 |" in text
    assert ("figures", 3) in fake_runs  # curves and reconstructions of the first seed's runs


def test_one_seed_says_the_noise_is_unmeasured(tmp_path, fake_runs):
    demo.run_demo(demo.DemoConfig(out=str(tmp_path), data_path="synthetic", progress=False))
    text = (tmp_path / "table.md").read_text()
    assert text.count("noise unmeasured") == 6  # 3 comparisons x 2 metrics: no low-label finetuning by default
    assert demo.ONE_SEED in text
    assert "| from scratch | - | - | 70.00 | 75.00 |" in text


def test_the_default_demo_spends_its_budget_on_pretraining(tmp_path, fake_runs):
    demo.run_demo(demo.DemoConfig(out=str(tmp_path), data_path="synthetic", progress=False))
    pretrainings = [c for c in fake_runs if c[0] == "pretrain"]
    # budget 0.4 for finetuning and probing, 1.5 for pretraining (12,288 images per epoch at budget 1)
    assert [c[3:] for c in pretrainings] == [(18_432, 3_264)] * 2
    assert [c[3] for c in fake_runs if c[0] == "finetune"] == [False] * 3  # no low-label runs
    assert json.loads((tmp_path / "table.json").read_text())["decoder_context"] == "image"


def test_all_label_finetuning_can_pass_over_the_whole_training_set(tmp_path, fake_runs):
    low = {"data_path": "synthetic", "labels_per_class": 100, "progress": False}
    demo.run_demo(demo.DemoConfig(out=str(tmp_path), **low))
    default = [c for c in fake_runs if c[0] == "finetune"]
    fake_runs.clear()
    demo.run_demo(demo.DemoConfig(out=str(tmp_path), finetune_epochs=2, **low))
    passes = [c for c in fake_runs if c[0] == "finetune"]
    assert {c[5] for c in default if not c[3]} == {("budget", None)}  # the budget's subset, the recipe's epochs
    assert {c[5] for c in passes if not c[3]} == {(None, 2)}  # every training image, twice
    assert [c for c in passes if c[3]] == [c for c in default if c[3]]  # the low-label runs do not change
    assert json.loads((tmp_path / "table.json").read_text())["finetune_epochs"] == 2
    assert "budget 0.4, pretraining budget 1.5, all labels x 2, seeds [0]" in (tmp_path / "table.md").read_text()


def test_demo_options_are_checked():
    with pytest.raises(ValueError, match="seeds=0"):
        demo.DemoConfig(seeds=0)
    with pytest.raises(ValueError, match="labels_per_class=0"):
        demo.DemoConfig(labels_per_class=0)
