"""Data sets: IDX parsing against hand-written files, ImageFolder layout and skipping, synthetic images."""

from __future__ import annotations

import gzip
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from starmamba.data import (
    FASHION_MNIST_DIR_ENV,
    Augmented,
    EvalTransform,
    FashionMNIST,
    ImageFolder,
    SyntheticImages,
    build_dataset,
)
from starmamba.data.datasets import UnreadableImagesError, read_idx


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_fashion(root: Path, images: dict, labels: dict, gz: bool) -> None:
    """``images`` / ``labels``: {'train': array, 't10k': array}, written as IDX files under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix in images:
        files = {"images-idx3": (images[prefix], 2051), "labels-idx1": (labels[prefix], 2049)}
        for kind, (array, magic) in files.items():
            data = idx_bytes(array, magic)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


@pytest.fixture
def tiny_fashion():
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5, 4, 3)), "t10k": rng.integers(0, 256, (2, 4, 3))}
    labels = {"train": np.array([9, 0, 3, 3, 1]), "t10k": np.array([7, 2])}
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_parse_to_exact_pixels_and_labels(tmp_path, tiny_fashion, gz):
    images, labels = tiny_fashion
    write_fashion(tmp_path, images, labels, gz)
    train = FashionMNIST(tmp_path, "train")
    assert len(train) == 5
    img, label = train[2]
    assert (img.mode, img.size, label) == ("RGB", (3, 4), 3)
    pixels = np.array(img)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], images["train"][2])
    val = FashionMNIST(tmp_path, "val")
    assert [val[i][1] for i in range(len(val))] == [7, 2]
    np.testing.assert_array_equal(np.array(val[1][0])[..., 1], images["t10k"][1])
    assert train.info.classes[9] == "Ankle boot"
    assert train.info.mean == (0.2860,) * 3 and train.info.std == (0.3530,) * 3


def test_limit_keeps_the_first_samples(tmp_path, tiny_fashion):
    write_fashion(tmp_path, *tiny_fashion, gz=True)
    subset = FashionMNIST(tmp_path, "train", limit=3)
    assert [subset[i][1] for i in range(len(subset))] == [9, 0, 3]
    with pytest.raises(ValueError, match="limit"):
        FashionMNIST(tmp_path, "train", limit=0)


def test_wrong_magic_names_the_file(tmp_path, tiny_fashion):
    images, labels = tiny_fashion
    write_fashion(tmp_path, images, labels, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(idx_bytes(labels["train"], 2051))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*2051.*2049"):
        FashionMNIST(tmp_path, "train")


def test_truncated_files_name_the_file(tmp_path, tiny_fashion):
    images, _ = tiny_fashion
    raw = idx_bytes(images["train"], 2051)
    path = tmp_path / "cut-images"
    path.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"cut-images.*need 60 bytes.*holds 59"):
        read_idx(path, 2051)
    path.write_bytes(raw[:10])
    with pytest.raises(ValueError, match=r"cut-images.*truncated IDX header"):
        read_idx(path, 2051)
    gz_path = tmp_path / "cut-images.gz"
    gz_path.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(ValueError, match=r"cut-images.gz.*gzip"):
        read_idx(gz_path, 2051)


def test_image_and_label_counts_must_match(tmp_path, tiny_fashion):
    images, labels = tiny_fashion
    write_fashion(tmp_path, images, {"train": labels["train"][:4], "t10k": labels["t10k"]}, gz=True)
    with pytest.raises(ValueError, match=r"5 images but .* 4 labels"):
        FashionMNIST(tmp_path, "train")


def test_missing_directory_and_files_explain_how_to_get_them(tmp_path, tiny_fashion):
    with pytest.raises(FileNotFoundError) as missing_dir:
        FashionMNIST(tmp_path / "nowhere")
    message = str(missing_dir.value)
    assert str(tmp_path / "nowhere") in message
    assert FASHION_MNIST_DIR_ENV in message and "dataset-fashion-mnist" in message
    images, labels = tiny_fashion
    write_fashion(tmp_path, {"train": images["train"]}, {"train": labels["train"]}, gz=True)
    with pytest.raises(FileNotFoundError, match=f"t10k-images-idx3-ubyte.*{FASHION_MNIST_DIR_ENV}"):
        FashionMNIST(tmp_path, "val")


def test_env_var_points_fashion_mnist_elsewhere(tmp_path, tiny_fashion, monkeypatch):
    write_fashion(tmp_path, *tiny_fashion, gz=False)
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    assert len(FashionMNIST(split="val")) == 2
    assert len(build_dataset("fashion_mnist", "train", limit=4)) == 4


def test_real_fashion_mnist(fashion_mnist_dir):
    train, val = FashionMNIST(fashion_mnist_dir, "train"), FashionMNIST(fashion_mnist_dir, "val")
    assert (len(train), len(val)) == (60000, 10000)
    # The published set is balanced: 6000 images per class in train, 1000 in t10k.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(val.labels).tolist() == [1000] * 10
    img, label = train[0]
    assert label == 9 and train.info.classes[label] == "Ankle boot"
    pixels = np.array(img)
    assert img.mode == "RGB" and pixels.shape == (28, 28, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels.max() == 255 and pixels.min() == 0


def save_image(path: Path, value: int, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


@pytest.fixture
def folder(tmp_path):
    """train: cat (3 images, one corrupt), dog (2); val: dog (1). Pixel value encodes (class, image)."""
    root = tmp_path / "imgs"
    save_image(root / "train" / "cat" / "a.png", 10)
    save_image(root / "train" / "cat" / "b.PNG", 11)
    (root / "train" / "cat" / "c.jpg").write_bytes(b"definitely not a JPEG" * 10)
    save_image(root / "train" / "dog" / "m.JpEg", 20)
    save_image(root / "train" / "dog" / "sub" / "y.bmp", 21)
    (root / "train" / "dog" / "notes.txt").write_text("ignored")
    save_image(root / "val" / "dog" / "v.png", 30)
    return root


def test_image_folder_classes_labels_and_extensions(folder):
    train = ImageFolder(folder, "train")
    assert train.info.classes == ("cat", "dog") and train.info.num_classes == 2
    assert train.info.mean == (0.485, 0.456, 0.406) and train.info.std == (0.229, 0.224, 0.225)
    assert [Path(p).name for p in train.paths] == ["a.png", "b.PNG", "c.jpg", "m.JpEg", "y.bmp"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    img, label = train[3]
    assert label == 1 and np.array(img)[0, 0, 0] == 20 and img.size == (6, 5)
    val = ImageFolder(folder, "val")
    assert val.info.classes == ("cat", "dog")
    assert len(val) == 1 and val[0][1] == 1  # 'dog' keeps its train index


def test_corrupt_image_is_skipped_with_a_warning(folder):
    train = ImageFolder(folder, "train", max_unreadable=0.5)
    with pytest.warns(UserWarning, match="c.jpg") as caught:
        img, label = train[2]
    assert (label, np.array(img)[0, 0, 0]) == (1, 20)  # the next readable sample
    assert train.num_skipped == 1
    assert "np.str_" not in str(caught[0].message)
    assert str(caught[0].message).startswith(f"skipping unreadable image {folder / 'train' / 'cat' / 'c.jpg'}: ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file already known to be unreadable is neither warned about nor recounted
        assert train[2][1] == 1
    assert train.num_skipped == 1


def test_skips_are_counted_across_dataloader_workers(folder):
    train = ImageFolder(folder, "train", max_unreadable=0.5)

    def collate(batch):
        # The first pixel identifies the image read.
        return torch.tensor([int(np.array(img)[0, 0, 0]) for img, _ in batch])

    loader = DataLoader(train, batch_size=2, num_workers=2, collate_fn=collate)
    values = torch.cat(list(loader)).tolist()
    assert values == [10, 11, 20, 20, 21]
    assert train.num_skipped == 1


def test_augmented_passes_the_skip_count_through(folder):
    data = Augmented(ImageFolder(folder, "train", max_unreadable=0.5), EvalTransform(4, (0.5,) * 3, (0.5,) * 3))
    with pytest.warns(UserWarning, match="c.jpg"):
        image, label = data[2]
    assert image.shape == (3, 4, 4) and label == 1 and data.num_skipped == 1
    assert not hasattr(Augmented(SyntheticImages(2), data.transform), "num_skipped")


def test_every_image_unreadable_raises(tmp_path):
    for name in ("a", "b"):
        path = tmp_path / "train" / "cls" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"garbage")
    data = ImageFolder(tmp_path, "train", max_unreadable=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableImagesError, match="none of the 2 images"):
            data[0]
    assert data.num_skipped == 2


def unreadable_folder(root: Path, readable: int) -> Path:
    """root/train/cls: ``readable`` good PNGs, then one of each kind of unreadable file."""
    for i in range(readable):
        save_image(root / "train" / "cls" / f"{i:03d}.png", i)
    good = (root / "train" / "cls" / "000.png").read_bytes()
    (root / "train" / "cls" / "x_empty.png").write_bytes(b"")
    (root / "train" / "cls" / "x_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "cls" / "x_text.jpg").write_text("not an image at all")
    return root


def test_unreadable_images_are_counted_once_each(tmp_path):
    data = ImageFolder(unreadable_folder(tmp_path, readable=7), "train", max_unreadable=0.3)
    with pytest.warns(UserWarning) as caught:
        seen = [data[i][1] for i in range(len(data))] + [data[i][1] for i in range(len(data))]  # two epochs
    assert len(seen) == 20 and data.num_skipped == 3
    assert sorted(Path(str(w.message).split()[3].rstrip(":")).name for w in caught) == [
        "x_empty.png", "x_text.jpg", "x_truncated.png",
    ]  # fmt: skip


def test_too_many_unreadable_images_is_a_clear_error(tmp_path):
    root = unreadable_folder(tmp_path, readable=7)  # 3 of 10 unreadable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allowed = ImageFolder(root, "train", max_unreadable=0.3)
        assert [allowed[i][1] for i in range(10)] == [0] * 10 and allowed.num_skipped == 3  # 30% is allowed
        data = ImageFolder(root, "train", max_unreadable=0.25)
        assert data[6][1] == 0 and data.num_skipped == 0
        with pytest.raises(UnreadableImagesError, match=r"3 of the 10 images under .*train are unreadable \(30.0%\)"):
            data[7]  # skipping forward meets all three
        assert data.num_skipped == 3
        with pytest.raises(UnreadableImagesError, match=r"max_unreadable=0\.25"):
            list(DataLoader(ImageFolder(root, "train", max_unreadable=0.25), batch_size=10))
        ImageFolder(root, "train").check_unreadable(count=0)
        with pytest.raises(UnreadableImagesError, match="1 of the 10"):  # default: 1% (a count summed over ranks)
            ImageFolder(root, "train").check_unreadable(count=1)
    with pytest.raises(ValueError, match=r"max_unreadable=1\.5 must lie in"):
        build_dataset(str(root), "train", max_unreadable=1.5)


def test_unreadable_error_from_a_loader_worker_is_one_line(tmp_path):
    data = ImageFolder(unreadable_folder(tmp_path, readable=2), "train", max_unreadable=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnreadableImagesError) as caught:
            list(DataLoader(data, batch_size=5, num_workers=1, collate_fn=list))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("1 of the 5 images under") and "max_unreadable=0 allows" in message


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10, 257 * 128 + 100, 65535], [1000, 30000, 50000, 65534]], dtype=np.uint16)
    save_path = tmp_path / "train" / "cls" / "deep.png"
    save_path.parent.mkdir(parents=True)
    Image.fromarray(values).save(save_path)
    Image.fromarray(values).save(tmp_path / "train" / "cls" / "deep.tif")
    data = ImageFolder(tmp_path, "train")
    expected = np.array([[0, 10, 128, 255], [4, 117, 195, 255]], dtype=np.uint8)  # round(v * 255 / 65535)
    for i in range(2):
        img, _ = data[i]
        pixels = np.array(img)
        assert img.mode == "RGB" and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, np.repeat(expected[..., None], 3, axis=2))


def png_rgb16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-sample RGB PNG written by hand (Pillow cannot write one): (H, W, 3) uint16."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_sixteen_bit_rgb_png_keeps_its_colours(tmp_path):
    pixels = np.array([[[65535, 0, 257 * 100], [257 * 7, 257 * 200 + 200, 65535]]], dtype=np.uint16)
    path = tmp_path / "train" / "cls" / "rgb48.png"
    path.parent.mkdir(parents=True)
    png_rgb16(path, pixels)
    img, _ = ImageFolder(tmp_path, "train")[0]
    # 51600 = 257 * 200 + 200 -> 201 (51600 * 255 / 65535 = 200.8; its high byte is 0xC9)
    np.testing.assert_array_equal(np.array(img), [[[255, 0, 100], [7, 201, 255]]])


def test_image_folder_errors_name_the_path(folder, tmp_path):
    (folder / "val" / "dog" / "v.png").unlink()
    with pytest.raises(ValueError, match=f"no images .* under {folder / 'val'}"):
        ImageFolder(folder, "val")
    save_image(folder / "val" / "bird" / "b.png", 1)
    with pytest.raises(ValueError, match=r"classes missing .*bird"):
        ImageFolder(folder, "val")
    with pytest.raises(FileNotFoundError, match="nothing"):
        ImageFolder(tmp_path / "nothing")
    (tmp_path / "only_val" / "val" / "dog").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "only_val" / "train")):
        ImageFolder(tmp_path / "only_val", "val")


def test_image_folder_limit_spreads_over_classes(tmp_path):
    for cls in range(3):
        for i in range(4):
            save_image(tmp_path / "train" / f"c{cls}" / f"{i}.png", 10 * cls + i)
    subset = ImageFolder(tmp_path, "train", limit=3)
    assert subset.labels.tolist() == [0, 1, 2]
    assert [Path(p).name for p in subset.paths] == ["0.png"] * 3
    assert len(ImageFolder(tmp_path, "train", limit=100)) == 12


def test_synthetic_images_are_deterministic_and_learnable():
    train, val = SyntheticImages(256, num_classes=4, size=16, seed=0), SyntheticImages(64, 4, 16, seed=1)
    img, label = train[5]
    again, same_label = SyntheticImages(256, 4, 16, seed=0)[5]
    assert img.size == (16, 16) and img.mode == "RGB" and label == same_label
    np.testing.assert_array_equal(np.array(img), np.array(again))
    assert not np.array_equal(np.array(train[5][0]), np.array(train[6][0]))
    assert set(train.labels.tolist()) == {0, 1, 2, 3}

    def pixels(data):
        return np.stack([np.array(data[i][0], dtype=np.float32).ravel() for i in range(len(data))])

    # A nearest-class-mean classifier on raw pixels separates the classes: they are learnable.
    x_train, x_val = pixels(train), pixels(val)
    means = np.stack([x_train[train.labels == k].mean(0) for k in range(4)])
    predicted = ((x_val[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == val.labels).mean() > 0.95


def test_build_dataset_dispatch(tmp_path, tiny_fashion, folder):
    synthetic = build_dataset("synthetic", "train")
    assert isinstance(synthetic, SyntheticImages) and len(synthetic) == 512
    assert len(build_dataset("synthetic", "val")) == 128
    assert len(build_dataset("synthetic", "val", limit=5)) == 5
    write_fashion(tmp_path / "fm", *tiny_fashion, gz=False)
    assert isinstance(build_dataset(str(tmp_path / "fm"), "val"), FashionMNIST)
    assert isinstance(build_dataset(str(folder), "train"), ImageFolder)
    with pytest.raises(FileNotFoundError, match="'no/such/dir' is neither"):
        build_dataset("no/such/dir", "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", "test")
