"""WebDataset tar shards, written here with webdataset's own TarWriter: read as a map-style data set."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds  # the test extra holds it: a missing one fails here rather than skipping
from PIL import Image
from torch.utils.data import DataLoader

from starmamba.cli import main
from starmamba.data import build_dataset
from starmamba.data import shards as shards_module
from starmamba.data.shards import CACHE_ENV, ShardImages, cache_dir, shard_files
from starmamba.data.sources import single_split
from starmamba.errors import RunError
from starmamba.train.finetune import run_finetune
from starmamba.train.pretrain import run_pretrain
from test_train_jobs import tiny_finetune, tiny_pretrain


def image(grey: int, size: int = 16) -> Image.Image:
    """An image whose pixels all hold ``grey``: which sample it is can be read back from any pixel."""
    return Image.fromarray(np.full((size, size, 3), grey, np.uint8))


def write_shards(folder: Path, prefix: str, samples: list[tuple[int, int | None]], per_shard: int) -> list[Path]:
    """(grey, label or None) samples as shards ``prefix-000000.tar``, ... of ``per_shard`` samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        paths.append(folder / f"{prefix}-{number:06d}.tar")
        with wds.TarWriter(str(paths[-1])) as sink:
            for i, (grey, label) in enumerate(samples[start : start + per_shard], start=start):
                sample = {"__key__": f"sample{i:06d}", "png": image(grey)}
                sink.write(sample | ({"cls": label} if label is not None else {}))
    return paths


def read_back(dataset) -> list[tuple[int, int]]:
    return [(int(np.asarray(img)[0, 0, 0]), label) for img, label in (dataset[i] for i in range(len(dataset)))]


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch) -> Path:
    """Shard indexes cached in the test's folder, not the user's."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "shard-index"


TRAIN = [(10 * i, i % 3) for i in range(10)]
VAL = [(5 + 10 * i, i % 3) for i in range(4)]


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shards(tmp_path / "shards", "train", TRAIN, per_shard=4)  # 3 shards: 4 + 4 + 2 samples
    write_shards(tmp_path / "shards", "val", VAL, per_shard=4)
    return tmp_path / "shards"


def test_a_brace_pattern_a_glob_and_the_folder_give_every_sample_in_order(shards):
    by_braces = build_dataset(str(shards / "train-{000000..000002}.tar"), "train")
    assert isinstance(by_braces, ShardImages)
    assert read_back(by_braces) == TRAIN
    assert by_braces.info.num_classes == 3 and by_braces.info.classes == ("0", "1", "2")
    assert read_back(build_dataset(str(shards / "train-*.tar"), "train")) == TRAIN
    assert read_back(build_dataset(str(shards), "train")) == TRAIN
    assert read_back(build_dataset(str(shards), "val")) == VAL
    two = f"{shards / 'train-000001.tar'}::{shards / 'train-000000.tar'}"  # WebDataset's list of shards
    assert read_back(build_dataset(two, "val")) == TRAIN[4:8] + TRAIN[:4]  # one split: either split is all of it
    assert single_split(str(shards / "train-*.tar")) and not single_split(str(shards))


def test_shards_in_split_subfolders_with_class_names_and_a_limit(tmp_path):
    write_shards(tmp_path / "data" / "train", "part", TRAIN, per_shard=3)
    write_shards(tmp_path / "data" / "val", "part", VAL, per_shard=3)
    (tmp_path / "data" / "classes.txt").write_text("cat\ndog\nbird\nfish\n")
    data = build_dataset(str(tmp_path / "data"), "train", limit=4)
    assert data.info.classes == ("cat", "dog", "bird", "fish") and data.info.num_classes == 4
    assert read_back(data) == [TRAIN[i] for i in (0, 2, 5, 7)]  # evenly spaced: i * 10 // 4
    assert read_back(build_dataset(str(tmp_path / "data"), "val")) == VAL


def test_dataloader_workers_read_the_shards_as_the_main_process_does(shards):
    data = build_dataset(str(shards), "train")
    greys = [grey for grey, _ in TRAIN]
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=lambda batch: batch)
    assert [int(np.asarray(img)[0, 0, 0]) for batch in loader for img, _ in batch] == greys


def test_shards_without_labels_are_unlabelled_and_for_pretraining_only(tmp_path):
    write_shards(tmp_path, "train", [(i, None) for i in range(5)], per_shard=5)
    data = build_dataset(str(tmp_path / "train-000000.tar"), "train", labels=False)
    assert read_back(data) == [(i, -1) for i in range(5)] and data.info.num_classes == 0
    with pytest.raises(ValueError, match=r"unlabelled images .* only pretraining"):
        build_dataset(str(tmp_path / "train-000000.tar"), "train")


def test_bad_shards_are_one_clear_error_each(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"1 shard\(s\) .* do not exist: .*train-000003.tar"):
        build_dataset(str(shards / "train-{000000..000003}.tar"), "train")
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        build_dataset(str(shards / "test-*.tar"), "train")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(ValueError, match=r"junk\.tar is not an uncompressed tar file"):
        build_dataset(str(tmp_path / "junk.tar"), "train")
    with wds.TarWriter(str(tmp_path / "word.tar")) as sink:
        sink.write({"__key__": "a", "png": image(1), "cls": "dog"})
    with pytest.raises(ValueError, match=r"a.cls holds 'dog', not a class index"):
        build_dataset(str(tmp_path / "word.tar"), "train")
    only_train = tmp_path / "only_train"
    write_shards(only_train, "train", TRAIN, per_shard=10)
    with pytest.raises(FileNotFoundError, match=r"none of the val split \(val/\*.tar or val-\*.tar\)"):
        build_dataset(str(only_train), "val")


def test_an_unreadable_image_in_a_shard_is_skipped_and_counted(tmp_path):
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for key, payload in (("a", image(7)), ("b", b"not an image"), ("c", image(9))):
            if isinstance(payload, Image.Image):
                buffer = io.BytesIO()
                payload.save(buffer, format="PNG")
                payload = buffer.getvalue()
            for name, data in ((f"{key}.png", payload), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = build_dataset(str(tmp_path / "mixed.tar"), "train", max_unreadable=0.5)
    with pytest.warns(UserWarning, match=r"mixed.tar:b.png"):
        assert [int(np.asarray(data[i][0])[0, 0, 0]) for i in range(3)] == [7, 9, 9]
    assert data.num_skipped == 1


def test_pretraining_and_finetuning_read_shards_end_to_end(tmp_path, shards):
    write_shards(tmp_path / "more", "train", [(i, i % 4) for i in range(16)], per_shard=6)
    write_shards(tmp_path / "more", "val", [(i, i % 4) for i in range(8)], per_shard=6)
    pre = run_pretrain(tiny_pretrain(tmp_path / "pre", data_path=str(tmp_path / "more" / "train-*.tar"), epochs=1))
    assert pre["steps"] == 2
    fine = run_finetune(tiny_finetune(tmp_path / "fine", data_path=str(tmp_path / "more"), epochs=1))
    assert fine["steps"] == 2 and 0 <= fine["acc1"] <= 100


def test_the_shards_of_a_pattern_are_listed_in_its_order(shards):
    files = shard_files(str(shards / "train-{000002,000000}.tar"))
    assert [f.name for f in files] == ["train-000002.tar", "train-000000.tar"]


def test_the_index_is_cached_and_read_again_until_the_shard_changes(tmp_path, shards, index_cache, monkeypatch):
    pattern = str(shards / "train-*.tar")
    assert read_back(build_dataset(pattern, "train")) == TRAIN
    assert cache_dir() == index_cache and len(list(index_cache.glob("*.npz"))) == 3

    def no_tar(*args, **kwargs):
        raise AssertionError("indexed again")

    monkeypatch.setattr(shards_module.tarfile, "open", no_tar)
    assert read_back(build_dataset(pattern, "train")) == TRAIN  # every index from the cache
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(index_cache.parent))

    changed = [(grey + 1, label) for grey, label in TRAIN[:3]]
    write_shards(shards, "train", changed, per_shard=4)  # train-000000.tar rewritten: 3 samples now
    assert read_back(build_dataset(pattern, "train")) == changed + TRAIN[4:]


def test_an_unwritable_cache_only_costs_indexing_again(tmp_path, shards, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a_file"))
    assert read_back(build_dataset(str(shards), "train")) == TRAIN


def test_without_webdataset_a_shard_pattern_says_which_extra_to_install(shards, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # as if it were not installed
    with pytest.raises(RunError, match=r"needs the webdataset package: pip install 'starmamba\[shards\]'"):
        build_dataset(str(shards / "train-*.tar"), "train")
    assert main(["pretrain", "--data_path", str(shards / "train-*.tar"), "--output_dir", str(shards / "run")]) == 2
    assert "pip install 'starmamba[shards]'" in capsys.readouterr().err
