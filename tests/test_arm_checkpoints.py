"""ARM's .pth format: the explicit key map, safe loading of its pickled argparse.Namespace."""

import argparse
import re

import pytest
import torch

from starmamba.models import ClassifierConfig, MambaMLPClassifier, create_model
from starmamba.models.arm import from_arm
from starmamba.models.loading import load_classifier, load_pretrained_state

SUFFIX = {0: "", 1: "_b", 2: "_c", 3: "_c_b"}


def to_arm_names(state: dict) -> dict:
    """Our classifier's weights under ARM's names, written independently of the library's map."""
    arm = {}
    for key, value in state.items():
        key = key.removeprefix("encoder.")
        if m := re.fullmatch(r"blocks\.(\d+)\.mixer\.directions\.(\d)\.(conv1d|x_proj|dt_proj)\.(\w+)", key):
            key = f"layers.{m[1]}.mixer.{m[3]}{SUFFIX[int(m[2])]}.{m[4]}"
        elif m := re.fullmatch(r"blocks\.(\d+)\.mixer\.directions\.(\d)\.A_log", key):
            key = f"layers.{m[1]}.mixer.A{SUFFIX[int(m[2])]}_log"
        elif m := re.fullmatch(r"blocks\.(\d+)\.mixer\.directions\.(\d)\.D", key):
            key = f"layers.{m[1]}.mixer.D{SUFFIX[int(m[2])]}"
        elif key.startswith("blocks."):
            key = "layers." + key.removeprefix("blocks.")
        elif key.startswith("norm."):
            key = "norm_f." + key.removeprefix("norm.")
        arm[key] = value
    return arm


def arm_classifier_state(model: MambaMLPClassifier) -> dict:
    """ARM's layout: a position slot for the middle class token, whose value ARM adds to the token."""
    arm = to_arm_names(model.state_dict())
    patches = model.encoder.pos_embed.shape[1]
    slot = torch.randn(1, 1, model.cfg.dim) * 0.02
    arm["pos_embed"] = torch.cat([arm["pos_embed"][:, : patches // 2], slot, arm["pos_embed"][:, patches // 2 :]], 1)
    arm["cls_token"] = arm["cls_token"] - slot  # so that token + slot is our class token
    return arm


@pytest.fixture
def arm_model():
    torch.manual_seed(0)
    cfg = ClassifierConfig(img_size=32, patch_size=8, dim=32, depth=2, num_classes=7, cls_token="middle",
                           global_pool=True)  # fmt: skip
    model = MambaMLPClassifier(cfg).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # make the logits depend on everything
    return model


def test_arm_finetuned_checkpoint_evaluates_identically(tmp_path, arm_model):
    args = argparse.Namespace(model="arm_base_pz16", global_pool=True, nb_classes=7, input_size=32)
    path = tmp_path / "checkpoint-99.pth"
    state = arm_classifier_state(arm_model)
    torch.save({"model": state, "model_ema": state, "epoch": 99, "args": args, "max_accuracy": 1.0}, path)
    loaded, description = load_classifier(path)
    assert "ARM" in description
    assert loaded.cfg.cls_token == "middle" and loaded.cfg.global_pool and loaded.cfg.num_classes == 7
    assert loaded.cfg.img_size == 32 and loaded.cfg.scans == 4
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(images), arm_model(images), rtol=1e-5, atol=1e-5)
    ema, _ = load_classifier(path, ema=True)
    torch.testing.assert_close(ema.eval()(images), arm_model(images), rtol=1e-5, atol=1e-5)


def test_global_pool_comes_from_the_saved_args(tmp_path, arm_model):
    path = tmp_path / "cls.pth"
    torch.save({"model": arm_classifier_state(arm_model), "args": argparse.Namespace(global_pool=False)}, path)
    loaded, _ = load_classifier(path)
    assert loaded.cfg.global_pool is False


def test_arm_pretraining_checkpoint_feeds_finetuning(tmp_path):
    torch.manual_seed(0)
    star = create_model("star_tiny", img_size=32, patch_size=8, dim=32, depth=2, images_per_sequence=1,
                        separator="none", cluster_size=2)  # fmt: skip
    arm = to_arm_names({k: v for k, v in star.state_dict().items() if k.startswith("encoder.")})
    decoder_keys = ("dec_block.0.attn2.q.weight", "enc2dec.weight", "norm_1.weight", "mask")
    arm |= {"ar_token": torch.zeros(1, 1, 8)} | {key: torch.zeros(2, 2) for key in decoder_keys}
    path = tmp_path / "pretrain.pth"
    torch.save({"model": arm, "args": argparse.Namespace(model="arm_base_pz16")}, path)
    state = load_pretrained_state(path)
    assert set(state) == {k for k in star.state_dict() if k.startswith("encoder.")}
    with pytest.raises(ValueError, match="pretraining checkpoint"):
        load_classifier(path)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match=r"not in ARM's format: layers\.0\.mixer\.weird"):
        from_arm({"layers.0.mixer.weird": torch.zeros(1)})


class Evil:
    """Stands for any object a malicious checkpoint might pickle."""


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        load_classifier(path)
