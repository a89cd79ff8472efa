"""Pretraining on unlabelled images: a flat folder (one split) or train/ and val/ without class folders."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from starmamba.cli import main
from starmamba.data import UnlabelledImages, build_dataset
from starmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from starmamba.data.sources import single_split
from starmamba.train.metrics import read_metrics
from starmamba.train.predict import run_data_config
from starmamba.train.pretrain import run_pretrain
from test_train_jobs import tiny_pretrain


def save_images(folder: Path, count: int, start: int = 0, nested: bool = True) -> list[int]:
    """``count`` 16 px PNGs of grey ``start + i``, some in a subfolder if ``nested``; their greys in path order."""
    for i in range(count):
        path = folder / ("more" if nested and i % 3 == 2 else "") / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), start + i, np.uint8)).save(path)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    return [start + int(Path(p).stem[3:]) for p in paths]


def greys(dataset) -> list[int]:
    return [int(np.asarray(dataset[i][0])[0, 0, 0]) for i in range(len(dataset))]


def test_a_flat_folder_is_one_unlabelled_split_for_pretraining_only(tmp_path):
    expected = save_images(tmp_path / "photos", 7)
    data = build_dataset(str(tmp_path / "photos"), "train", labels=False)
    assert isinstance(data, UnlabelledImages)
    assert greys(data) == expected  # every image, subfolders included, in sorted path order
    assert [data[i][1] for i in range(len(data))] == [-1] * 7
    assert data.info.num_classes == 0 and data.info.classes == ()
    assert single_split(str(tmp_path / "photos"))
    assert greys(build_dataset(str(tmp_path / "photos"), "val", labels=False)) == expected
    limited = build_dataset(str(tmp_path / "photos"), "train", limit=3, labels=False)
    assert greys(limited) == [expected[i] for i in (0, 2, 4)]  # evenly spaced: i * 7 // 3
    with pytest.raises(ValueError, match=r"unlabelled images .* only pretraining .*root/train/<class>/<image>"):
        build_dataset(str(tmp_path / "photos"), "train")


def test_train_and_val_folders_without_class_folders_are_two_unlabelled_splits(tmp_path):
    # Images directly in train/ and val/: a subfolder of train/ would be a class folder.
    train = save_images(tmp_path / "data" / "train", 5, nested=False)
    val = save_images(tmp_path / "data" / "val", 3, start=100, nested=False)
    assert greys(build_dataset(str(tmp_path / "data"), "train", labels=False)) == train
    assert greys(build_dataset(str(tmp_path / "data"), "val", labels=False)) == val
    assert not single_split(str(tmp_path / "data"))
    with pytest.raises(ValueError, match="unlabelled images"):
        build_dataset(str(tmp_path / "data"), "val")


def test_pretraining_on_a_flat_folder_logs_no_validation_loss_and_reconstructs_training_images(tmp_path, capsys):
    save_images(tmp_path / "photos", 16)
    summary = run_pretrain(tiny_pretrain(tmp_path / "run", data_path=str(tmp_path / "photos"), epochs=1))
    assert summary["steps"] == 2  # 16 images, batch 8
    assert "no validation loss" in capsys.readouterr().out
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any("loss" in r for r in records) and not any("val_loss" in r for r in records)
    assert (tmp_path / "run" / "reconstructions.png").is_file()


def test_finetuning_on_unlabelled_images_is_one_line_and_exit_code_2(tmp_path, capsys):
    save_images(tmp_path / "photos", 4)
    save_images(tmp_path / "data" / "train", 4, nested=False)
    save_images(tmp_path / "data" / "val", 4, nested=False)
    common = ["--output_dir", str(tmp_path / "run"), "--num_workers", "0"]
    assert main(["finetune", "--data_path", str(tmp_path / "photos"), *common]) == 2
    assert "is one set of images: finetuning trains on a train split" in capsys.readouterr().err
    assert main(["finetune", "--data_path", str(tmp_path / "data"), *common]) == 2
    err = capsys.readouterr().err
    assert "holds unlabelled images" in err and len(err.strip().splitlines()) == 1


def test_export_reads_the_normalisation_of_an_unlabelled_folder_without_a_warning(tmp_path):
    save_images(tmp_path / "photos", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_data_config({"data_path": str(tmp_path / "photos")}, classifier=False) == {
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }
