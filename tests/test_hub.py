"""Hub folders: save_pretrained / from_pretrained / create_model(pretrained=...) round trips and every
refusal, all offline (the Hub is never asked: any download attempt fails the test)."""

import json
import shutil

import pytest
import torch

import starmamba
from starmamba.models import ClassifierConfig, MambaMLPClassifier, StarPretrainer, create_model
from starmamba.models.registry import model_name

TINY = dict(img_size=16, patch_size=4, dim=32, depth=2)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Fail on any attempt to reach the Hub: these tests read local folders only."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr("huggingface_hub.hub_mixin.hf_hub_download", refuse)
    monkeypatch.setattr("starmamba.models.hub.hf_hub_download", refuse)


def trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Weights no fresh model has (everything in the state dict moved), so a round trip must carry them."""
    torch.manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    return model.eval()


@pytest.fixture
def classifier_folder(tmp_path):
    model = trained_like(create_model("mambamlp_tiny", **TINY, num_classes=5, cls_token="middle"))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    folder = tmp_path / "classifier"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture
def star_folder(tmp_path):
    model = trained_like(create_model("star_small", **TINY, images_per_sequence=2, cluster_size=2, decoder_dim=32,
                                      decoder_head_dim=16, separator_value="embedding"))  # fmt: skip
    folder = tmp_path / "star"
    model.save_pretrained(folder)
    return model, folder


def test_classifier_round_trip(classifier_folder):
    model, folder = classifier_folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mambamlp_tiny" and config["model_args"]["cls_token"] == "middle"
    assert "library_name: starmamba" in (folder / "README.md").read_text()
    x = torch.randn(3, 3, 16, 16)
    loaders = (MambaMLPClassifier.from_pretrained, lambda f: starmamba.create_model("mambamlp_tiny", pretrained=f))
    for loaded in (load(folder) for load in loaders):
        assert not loaded.training and loaded.cfg == model.cfg
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        assert loaded.pretrained_cfg == model.pretrained_cfg  # mean/std of the weights travel with them


def test_star_round_trip(star_folder):
    model, folder = star_folder
    loaded = StarPretrainer.from_pretrained(str(folder))
    assert loaded.cfg == model.cfg
    x = torch.randn(4, 3, 16, 16)
    mine, theirs = loaded(x), model(x)
    torch.testing.assert_close(mine.pred, theirs.pred, rtol=0, atol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=0)
    assert create_model("star_small", pretrained=folder).cfg == model.cfg


def test_overrides_and_a_new_head(classifier_folder):
    model, folder = classifier_folder
    x = torch.randn(2, 3, 16, 16)
    loaded = create_model("mambamlp_tiny", pretrained=folder, num_classes=3, drop_path=0.2)
    assert loaded.cfg.num_classes == 3 and loaded.cfg.drop_path == 0.2 and loaded.head.out_features == 3
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(loaded.forward_head(loaded.forward_features(x), pre_logits=True), pooled, rtol=0, atol=0)


def test_a_directly_built_model_names_its_nearest_preset(tmp_path):
    assert model_name(ClassifierConfig(dim=96, depth=6)) == "mambamlp_tiny"
    assert model_name(ClassifierConfig(dim=1024, depth=24)) == "mambamlp_large"
    MambaMLPClassifier(ClassifierConfig(**TINY, num_classes=2)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "mambamlp_tiny"
    assert create_model("mambamlp_tiny", pretrained=tmp_path).cfg.dim == 32


def test_another_models_folder_is_refused(classifier_folder, star_folder):
    _, classifier = classifier_folder
    _, star = star_folder
    with pytest.raises(ValueError, match=r"holds star_small, a StarPretrainer, not a MambaMLPClassifier"):
        MambaMLPClassifier.from_pretrained(star)
    # A pretraining folder gives a classifier its encoder (as --finetune does), which must fit.
    with pytest.raises(ValueError, match=r"does not fit this classifier; .*pass the encoder's options"):
        create_model("mambamlp_small", pretrained=star)
    with pytest.raises(ValueError, match=r"holds the model star_small, not star_base"):
        create_model("star_base", pretrained=star)
    with pytest.raises(ValueError, match=r"holds the model mambamlp_tiny, not mambamlp_base"):
        create_model("mambamlp_base", pretrained=classifier)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if key in config["model_args"]:
            config["model_args"][key] = value
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_or_truncated_weights(classifier_folder, tmp_path):
    _, folder = classifier_folder
    truncated = shutil.copytree(folder, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors \(truncated or not safetensors\?\)"):
        MambaMLPClassifier.from_pretrained(truncated)
    (truncated / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"truncated has no model.safetensors"):
        MambaMLPClassifier.from_pretrained(truncated)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"architecture": "mambamlp_gigantic"}, r"unknown model 'mambamlp_gigantic'; did you mean"),
        ({"architecture": "vit_base_patch16_224"}, r"unknown model 'vit_base_patch16_224'"),
        ({"architecture": 3}, r"'architecture' must be a model name"),
        ({"dimm": 3, "model_args": {"dimm": 3}}, r"unknown option\(s\) dimm for mambamlp_tiny"),
        ({"cls_token": "head"}, r"cls_token='head' is not one of"),
        (
            {"dim": 64},
            r"do not fit mambamlp_tiny .*shape mismatches .*: cls_token \(1, 1, 32\) vs \(1, 1, 64\)",
        ),
        ({"depth": 3}, r"do not fit mambamlp_tiny .*\d+ missing keys: encoder\.blocks\.2\."),
        ({"cls_token": "none", "global_pool": True}, r"1 unexpected keys: cls_token"),
    ],
)
def test_config_errors(classifier_folder, changes, message):
    _, folder = classifier_folder
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        MambaMLPClassifier.from_pretrained(folder)


def test_folders_without_a_starmamba_config(classifier_folder, tmp_path):
    _, folder = classifier_folder
    (folder / "config.json").write_text(json.dumps({"hidden_size": 512}))
    with pytest.raises(ValueError, match=r"config.json is not a starmamba model config"):
        MambaMLPClassifier.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        create_model("mambamlp_tiny", pretrained=folder)
    with pytest.raises(FileNotFoundError, match=r"is not a model folder"):
        create_model("mambamlp_tiny", pretrained=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"is not a model folder"):
        MambaMLPClassifier.from_pretrained(folder / "model.safetensors")
