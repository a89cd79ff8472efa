"""Experiments shared by demo and ablate: cached runs, row grouping, mean +- std, the table layouts."""

import dataclasses
import json
import statistics
from pathlib import Path
from typing import get_args

import pytest

from starmamba.experiments import ablate
from starmamba.experiments.recipes import Scale, finetune_config, pretrain_config
from starmamba.experiments.runs import cached_run, config_key
from starmamba.models.backbone import ClassToken
from starmamba.models.layout import SeparatorPosition, SeparatorType, SeparatorValue


def test_budget_scales_whole_batches_with_a_floor():
    assert Scale(budget=1.0).images(10_240) == 10_240
    assert Scale(budget=0.5).images(10_240) == 5_120
    assert Scale(budget=0.0001).images(10_240) == 2 * 64  # never less than two batches


def test_config_key_ignores_where_and_how_a_run_shows_itself(tmp_path):
    base = pretrain_config(Scale(), tmp_path / "a", seed=0)
    moved = dataclasses.replace(base, output_dir=str(tmp_path / "b"), progress=False, num_workers=3)
    assert config_key(base) == config_key(moved)
    assert config_key(base) != config_key(dataclasses.replace(base, seed=1))
    assert config_key(base) != config_key(pretrain_config(Scale(), tmp_path, 0, images_per_sequence=4))


def test_layer_decay_only_applies_to_pretrained_weights(tmp_path):
    assert finetune_config(Scale(), tmp_path, 0).layer_decay == 1.0
    assert finetune_config(Scale(), tmp_path, 0, pretrained="w.safetensors").layer_decay == 0.75


def test_a_finished_run_is_not_run_again(tmp_path):
    calls = []

    def run(config):
        calls.append(config.output_dir)
        return {"acc1": 50.0 + len(calls), "output_dir": config.output_dir}

    config = finetune_config(Scale(), tmp_path, seed=0)
    first = cached_run(tmp_path, config, run)
    again = cached_run(tmp_path, dataclasses.replace(config, progress=False), run)
    other_seed = cached_run(tmp_path, dataclasses.replace(config, seed=1), run)
    assert first == again == {"acc1": 51.0, "output_dir": calls[0]}
    assert other_seed["acc1"] == 52.0 and len(calls) == 2
    assert calls[0].endswith(f"finetune-{config_key(config)}")


@pytest.fixture
def fake_runs(monkeypatch):
    """Replace training with a deterministic function of (seed, options); record every call."""
    calls = {"pretrain": [], "finetune": []}

    def pretrain(scale, root, seed, star):
        calls["pretrain"].append((seed, json.dumps(star, sort_keys=True)))
        return {"seconds": 10.0 + seed, "output_dir": f"pre-{seed}-{len(calls['pretrain'])}"}

    def finetune(scale, root, seed, pre, options):
        calls["finetune"].append((seed, pre["output_dir"], options))
        bonus = 1.0 if options.get("cls_token") == "tail" else 0.0
        return {"acc1": 80.0 + seed + bonus, "ema_acc1": 81.0 + 2 * seed, "output_dir": f"fine-{len(calls)}"}

    def knn_probe(scale, root, seed, pre, star):
        if pre is None:  # the encoder at random initialisation: 50, 51, 52, ... by seed
            calls.setdefault("random_init", []).append((seed, json.dumps(star)))
            return {"acc1": 50.0 + seed, "output_dir": f"random-{seed}"}
        calls.setdefault("probe", []).append((seed, pre["output_dir"]))
        return {"acc1": 60.0 + 3 * seed + len(json.dumps(star))}  # rows differ by their options' length

    monkeypatch.setattr(ablate, "pretrain", pretrain)
    monkeypatch.setattr(ablate, "finetune", finetune)
    monkeypatch.setattr(ablate, "knn_probe", knn_probe)
    return calls


def test_rows_sharing_a_pretraining_pretrain_once_per_seed(tmp_path, fake_runs):
    report = ablate.run_ablation(ablate.AblateConfig(table=5, seeds=3, out=str(tmp_path), progress=False))
    assert len(fake_runs["pretrain"]) == 3 and len(fake_runs["finetune"]) == 6
    middle, tail = report["rows"]
    assert middle["acc1"]["values"] == [80.0, 81.0, 82.0] and tail["acc1"]["values"] == [81.0, 82.0, 83.0]
    assert middle["acc1"]["mean"] == 81.0 and middle["acc1"]["std"] == pytest.approx(1.0)
    assert middle["ema_acc1"]["std"] == pytest.approx(statistics.stdev([81.0, 83.0, 85.0]))
    markdown = (tmp_path / "table5.md").read_text()
    assert len(fake_runs["probe"]) == 3  # one probe per pretraining
    knn = 60.0 + len(json.dumps(ablate.TABLES[5][1][0].star))
    assert middle["knn_acc1"]["values"] == tail["knn_acc1"]["values"] == [knn, knn + 3, knn + 6]
    # paired per seed: tail - middle = 1 on every seed, so no spread
    assert tail["acc1_vs_first"] == {"differences": [1.0, 1.0, 1.0], "mean": 1.0, "std": 0.0, "seeds": 3}
    # every row is also compared with the paper's encoder at random initialisation, probed once per seed
    assert fake_runs["random_init"] == [(0, "{}"), (1, "{}"), (2, "{}")]
    assert report["random_init_knn_acc1"]["values"] == [50.0, 51.0, 52.0]
    assert tail["knn_acc1_vs_random_init"]["differences"] == [knn - 50, knn - 48, knn - 46]
    assert "random initialisation (k-NN top-1 51.00 ± 1.00)" in markdown
    assert (
        f"| STAR* (tail class token) | 81.89 | 82.61 | {knn + 3:.2f} ± 3.00 | +{knn - 48:.2f} ± 2.00 | +0.00 ± 0.00 "
        "| 82.00 ± 1.00 | +1.00 ± 0.00 | 83.00 ± 2.00 |" in markdown
    )
    assert json.loads((tmp_path / "table5.json").read_text())["rows"][1]["label"] == "STAR* (tail class token)"


def test_table_3_reports_pretraining_time(tmp_path, fake_runs):
    ablate.run_ablation(ablate.AblateConfig(table=3, seeds=2, out=str(tmp_path), progress=False))
    lines = (tmp_path / "table3.md").read_text().splitlines()
    assert lines[2].endswith("paper time (h) | ours pretrain (s) |")
    assert lines[5].startswith("| CS | 77.93 | 77.94 |") and lines[5].endswith("| 24.6 | 10 |")  # mean of 10, 11


def test_ablations_finetune_with_the_middle_class_token_except_star_star():
    positions = {(table, row.label): row.classifier["cls_token"] for table, (_, rows) in ablate.TABLES.items()
                 for row in rows}  # fmt: skip
    assert {key for key, where in positions.items() if where != "middle"} == {(5, "STAR* (tail class token)")}
    assert len(positions) == 22


def test_every_row_runs_the_configuration_it_names(tmp_path):
    for _, rows in ablate.TABLES.values():
        for row in rows:
            arch = pretrain_config(Scale(), tmp_path, 0, **row.star).arch
            assert {key: getattr(arch, key) for key in row.star} == row.star, row.label
            classifier = finetune_config(Scale(), tmp_path, 0, **row.classifier).arch
            assert {key: getattr(classifier, key) for key in row.classifier} == row.classifier, row.label


@pytest.mark.parametrize(
    "table, option, choices",
    [
        (1, "separator", set(get_args(SeparatorType))),
        (2, "separator_value", set(get_args(SeparatorValue))),
        (3, "separator_position", set(get_args(SeparatorPosition))),
        (4, "images_per_sequence", {1, 2, 4, 8, 16}),  # the paper's Table 4
        ("decoder_context", "decoder_context", {"image", "sequence"}),
    ],
)
def test_each_table_runs_every_choice_of_its_option(tmp_path, table, option, choices):
    _, rows = ablate.TABLES[table]
    star_rows = [row for row in rows if row.star is not ablate.ARM]
    assert {getattr(pretrain_config(Scale(), tmp_path, 0, **row.star).arch, option) for row in star_rows} == choices
    assert {row.classifier["cls_token"] for row in ablate.TABLES[5][1]} == set(get_args(ClassToken)) - {"none"}


def test_decoder_context_table_is_written_under_its_name(tmp_path, fake_runs):
    ablate.run_ablation(ablate.AblateConfig(table="decoder_context", seeds=2, out=str(tmp_path), progress=False))
    lines = (tmp_path / "decoder_context.md").read_text().splitlines()
    assert lines[4].startswith("| image | - | - |") and lines[5].startswith("| sequence | - | - |")
    rows = json.loads((tmp_path / "decoder_context.json").read_text())["rows"]
    assert [row["star"]["decoder_context"] for row in rows] == ["image", "sequence"]


def test_no_finetune_reports_the_probe_alone(tmp_path, fake_runs):
    config = ablate.AblateConfig(table=1, seeds=2, out=str(tmp_path), progress=False, finetune=False)
    report = ablate.run_ablation(config)
    assert fake_runs["finetune"] == [] and len(fake_runs["probe"]) == 8
    arm, none = report["rows"][:2]
    # Rows differ in their options; seeds 0 and 1 add 0 and 3 to every row alike.
    gap = len(json.dumps(none["star"])) - len(json.dumps(arm["star"]))
    assert none["knn_acc1_vs_first"]["differences"] == [gap, gap] and none["acc1"] is None
    assert "| None | 78.64 | 78.63 |" in (tmp_path / "table1.md").read_text()


def test_table_5_runs_both_readouts_from_one_pretraining_per_seed(tmp_path, fake_runs):
    config = ablate.AblateConfig(table=5, seeds=2, out=str(tmp_path), progress=False, readout="both")
    report = ablate.run_ablation(config)
    assert len(fake_runs["pretrain"]) == 2 and len(fake_runs["finetune"]) == 8
    seed0 = [options for seed, _, options in fake_runs["finetune"] if seed == 0]
    assert seed0 == [
        {"cls_token": where, "global_pool": pool} for where in ("middle", "tail") for pool in (True, False)
    ]
    assert [row["label"] for row in report["rows"]] == [
        "STAR (middle class token), mean-of-patches readout",
        "STAR (middle class token), class-token readout",
        "STAR* (tail class token), mean-of-patches readout",
        "STAR* (tail class token), class-token readout",
    ]


@pytest.mark.parametrize("readout, pooled", [("mean", True), ("class_token", False)])
def test_one_readout_is_every_rows_readout_and_named_in_the_title(tmp_path, fake_runs, readout, pooled):
    config = ablate.AblateConfig(table=1, seeds=1, out=str(tmp_path), progress=False, readout=readout)
    report = ablate.run_ablation(config)
    assert {options["global_pool"] for _, _, options in fake_runs["finetune"]} == {pooled}
    assert report["title"].endswith(ablate.READOUT_NAMES[readout])
    assert ablate.AblateConfig(table=1).readout == "mean"  # ARM's finetuning recipe


def test_low_label_finetuning_takes_as_many_steps_as_full_label():
    from starmamba.experiments.recipes import EPOCHS, FINETUNE_IMAGES, FINETUNE_WARMUP_EPOCHS, low_label_options

    scale = Scale(budget=1.0)
    options = low_label_options(scale, num_classes=10, per_class=100)
    # 8192 images x 1 epoch at budget 1 = 8192 images seen; 1000 labelled images -> 8 epochs
    assert options == {
        "labels_per_class": 100, "limit_train": None, "epochs": 8, "eval_every": 8,
        "warmup_epochs": FINETUNE_WARMUP_EPOCHS * 8.192,
    }  # fmt: skip
    assert scale.images(FINETUNE_IMAGES) * EPOCHS == 8192
    config = dataclasses.replace(finetune_config(scale, Path("runs"), 0), **options)
    assert config.labels_per_class == 100 and config.limit_train is None


def test_every_small_scale_number_is_on_the_whole_validation_split_by_default(tmp_path):
    assert Scale().val_images is None
    config = finetune_config(Scale(), tmp_path, 0)
    assert config.limit_val is None and config.eval_every == config.epochs  # measured once, at the end
    # The pretraining loss (a curve, not a reported number) is followed on 1024 validation images.
    assert pretrain_config(Scale(), tmp_path, 0).limit_val == 1024
    assert pretrain_config(Scale(val_images=200), tmp_path, 0).limit_val == 200


def _threads_and_power(base: int, exponent: int) -> tuple[int, int]:
    import torch

    return torch.get_num_threads(), base**exponent


def test_run_tasks_keeps_the_order_and_splits_the_cores_between_processes():
    import os

    from starmamba.experiments.runs import run_tasks

    tasks = [(2, 3), (3, 2), (5, 1)]
    assert [power for _, power in run_tasks(_threads_and_power, tasks)] == [8, 9, 5]
    results = run_tasks(_threads_and_power, tasks, jobs=2)
    assert [power for _, power in results] == [8, 9, 5]
    assert {threads for threads, _ in results} == {max(1, (os.cpu_count() or 1) // 2)}
