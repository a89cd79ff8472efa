"""``starmamba predict``: a tiny finetuning run on class folders, then its top-k classes by name, from the run
folder and from its export, against the model's probabilities computed here."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from starmamba.cli import main
from starmamba.data import EvalTransform
from starmamba.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR_ENV, IMAGENET_MEAN, IMAGENET_STD
from starmamba.models import model_config
from starmamba.models.loading import load_classifier
from starmamba.train.config import FinetuneConfig
from starmamba.train.export import export_run
from starmamba.train.finetune import run_finetune
from starmamba.train.predict import load_predictor, run_data_config, transform_of

CLASSES = ("cat", "dog", "frog")
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "frog": (40, 40, 200)}


def picture(colour: tuple[int, int, int], seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-30, 30, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def finetune_options(data: Path, out: Path, **changes) -> FinetuneConfig:
    arch = model_config("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2)
    options = dict(model="mambamlp_tiny", arch=arch, data_path=str(data), output_dir=str(out), batch_size=4,
                   epochs=1, warmup_epochs=0, num_workers=0, progress=False, tensorboard=False, ema_decay=None,
                   mixup=0.0, cutmix=0.0, aa="", reprob=0.0)  # fmt: skip
    return FinetuneConfig(**(options | changes))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finetuning run of one epoch on three class folders of coloured 20 x 16 pictures."""
    root = tmp_path_factory.mktemp("predict")
    seed = 100
    for split, count in (("train", 4), ("val", 1)):
        for name in CLASSES:
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                seed += 1
                picture(COLOURS[name], seed).save(root / "data" / split / name / f"{i}.png")
    run_finetune(finetune_options(root / "data", root / "run"))
    return root / "run"


@pytest.fixture
def images(tmp_path) -> list[Path]:
    folder = tmp_path / "mine"
    (folder / "deeper").mkdir(parents=True)
    paths = [folder / "a.png", folder / "deeper" / "b.jpg", tmp_path / "c.bmp"]
    for seed, (path, name) in enumerate(zip(paths, CLASSES, strict=True)):
        picture(COLOURS[name], seed, size=(24, 18)).save(path)
    return paths


def expected_top(run: Path, paths: list[Path], k: int) -> list[list[tuple[str, float]]]:
    """Top-k (name, probability) by hand: the run's weights, its evaluation transform (square resize to 18, then
    the 16 px centre crop: crop_pct 0.875) with the class folders' ImageNet statistics."""
    model, _ = load_classifier(run)
    transform = EvalTransform(16, IMAGENET_MEAN, IMAGENET_STD, crop_pct=0.875, resize="square")
    with torch.no_grad():
        probabilities = model.eval()(torch.stack([transform(Image.open(p)) for p in paths])).softmax(dim=-1)
    return [
        sorted(((CLASSES[i], p) for i, p in enumerate(row.tolist())), key=lambda item: -item[1])[:k]
        for row in probabilities
    ]


def predicted(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    records = [json.loads(line) for line in stdout.splitlines()]
    return [(r["path"], [(t["label"], t["probability"]) for t in r["top_k"]]) for r in records]


def test_run_keeps_the_class_folders_names(run):
    assert json.loads((run / "config.json").read_text())["label_names"] == list(CLASSES)


def test_predict_a_run_gives_each_images_top_classes_by_name(run, images, tmp_path, capsys):
    broken = tmp_path / "mine" / "broken.png"
    broken.write_bytes(b"not an image")
    assert main(["predict", str(run), str(tmp_path / "mine"), str(images[2]), "--top_k", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    # Folders are searched recursively and sorted; the unreadable file is skipped with a line.
    order = [images[0], images[1], images[2]]
    assert f"skipping unreadable image {broken}" in err
    got = predicted(out)
    assert [path for path, _ in got] == [str(p) for p in order]
    for (_, top), expected in zip(got, expected_top(run, order, 2), strict=True):
        assert [name for name, _ in top] == [name for name, _ in expected]
        assert [p for _, p in top] == pytest.approx([p for _, p in expected], abs=1e-6)

    assert main(["predict", str(run), str(images[0]), "--top_k", "10"]) == 0  # at most the model's 3 classes
    (name, probability), *_ = expected_top(run, images[:1], 3)[0]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: {name} {100 * probability:.1f}%") and line.count("%") == 3


def test_predict_an_export_gives_what_the_run_gives(run, images, tmp_path, capsys):
    hub = export_run(run, tmp_path / "hub")
    cfg = load_predictor(hub).pretrained_cfg
    assert cfg["label_names"] == CLASSES and cfg["crop_mode"] == "squash" and cfg["crop_pct"] == 0.875
    assert main(["predict", str(hub), *map(str, images), "--json"]) == 0
    from_hub = predicted(capsys.readouterr().out)
    assert main(["predict", str(run), *map(str, images), "--json"]) == 0
    assert from_hub == predicted(capsys.readouterr().out)
    assert [top[0][0] for _, top in from_hub] == [expected[0][0] for expected in expected_top(run, images, 1)]


def test_transform_follows_the_pretrained_cfg():
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 0.8,
           "crop_mode": "center", "interpolation": "bilinear"}  # fmt: skip
    image = picture((90, 120, 150), 0, size=(40, 30))
    # timm's "center": the shorter side to 16 / 0.8 = 20 px, aspect kept, then the centre 16 x 16.
    by_hand = image.resize((26, 20), Image.Resampling.BILINEAR).crop((5, 2, 21, 18))
    pixels = torch.from_numpy(np.array(by_hand, dtype=np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(transform_of(cfg)(image), (pixels - 0.5) / 0.25)
    # "squash": the whole image to a 20 x 20 square, then the crop.
    squashed = image.resize((20, 20), Image.Resampling.BILINEAR).crop((2, 2, 18, 18))
    pixels = torch.from_numpy(np.array(squashed, dtype=np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(transform_of(cfg | {"crop_mode": "squash"})(image), (pixels - 0.5) / 0.25)
    with pytest.raises(ValueError, match="crop_mode='border'"):
        transform_of(cfg | {"crop_mode": "border"})
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        transform_of(cfg | {"interpolation": "cubic"})


def test_fashion_mnist_runs_are_described_with_its_class_names(fashion_mnist_dir, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(fashion_mnist_dir))
    cfg = run_data_config({"data_path": "fashion_mnist", "crop_pct": 1.0, "eval_resize": "square"}, classifier=True)
    assert cfg["label_names"] == FASHION_MNIST_CLASSES and cfg["mean"] == (0.2860,) * 3
    given = run_data_config({"data_path": "fashion_mnist", "label_names": list("abcdefghij")}, classifier=True)
    assert given["label_names"] == tuple("abcdefghij") and given["crop_mode"] == "center"  # shorter side


def test_label_names_given_must_name_every_class(run, tmp_path):
    data = json.loads((run / "config.json").read_text())["data_path"]
    with pytest.raises(ValueError, match=r"--label_names names 2 classes, .* has 3"):
        run_finetune(finetune_options(Path(data), tmp_path / "two", label_names=("x", "y")))


def test_predict_refuses_what_it_cannot_use(run, images, tmp_path, capsys):
    assert main(["predict", str(run), str(tmp_path / "absent.png")]) == 2
    assert "absent.png does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "empty"), str(images[0])]) == 2
    assert "neither a finetuning run's folder nor a Hub folder" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")
    assert main(["predict", str(run), str(broken)]) == 2
    assert "none of the 1 images could be read" in capsys.readouterr().err
