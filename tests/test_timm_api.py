"""timm's model API on the classifier: features/head split, head reset, parameter groups, data config and
``forward_intermediates`` checked against the blocks run by hand."""

import json

import pytest
import torch

from starmamba.models import ClassifierConfig, MambaMLPClassifier, create_model, list_models
from starmamba.models.mixer import scan_orders
from starmamba.models.pos_embed import sincos_2d
from starmamba.train.checkpoint import export_weights
from starmamba.train.optim import layer_ids, param_groups

GRID = 4  # 16 px images, 4 px patches


def classifier(**overrides) -> MambaMLPClassifier:
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, dim=32, depth=3, num_classes=5) | overrides
    model = MambaMLPClassifier(ClassifierConfig(**cfg)).double().eval()
    with torch.no_grad():
        model.head.weight.normal_()  # logits that depend on every feature
    return model


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def patch_positions(cls_index: int | None) -> list[int]:
    """Sequence position of each patch (row-major) when the class token sits at ``cls_index``."""
    return [p + (cls_index is not None and p >= cls_index) for p in range(GRID * GRID)]


def blocks_by_hand(model: MambaMLPClassifier, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every block's output tokens (B, L, dim), and the same as maps (B, dim, H/p, W/p) written out
    patch by patch, computed from the model's parts without its helpers."""
    tokens = model.encoder.patch_embed.proj(x).flatten(2).transpose(1, 2) + model.encoder.pos_embed
    cls_index = {"tail": GRID * GRID, "middle": GRID * GRID // 2, "none": None}[model.cfg.cls_token]
    if cls_index is not None:
        cls = model.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :cls_index], cls, tokens[:, cls_index:]], dim=1)
    orders = scan_orders(GRID, GRID, cls_index) if model.cfg.scans == 4 else None
    outputs, maps = [], []
    for block in model.encoder.blocks:
        tokens = block(tokens, orders)
        outputs.append(tokens)
        grid = torch.empty(x.shape[0], model.cfg.dim, GRID, GRID, dtype=x.dtype)
        for patch, position in enumerate(patch_positions(cls_index)):
            grid[:, :, patch // GRID, patch % GRID] = tokens[:, position]
        maps.append(grid)
    return outputs, maps


READOUTS = [(1, "tail", False), (4, "tail", False), (4, "middle", False), (4, "middle", True), (1, "none", True)]


@pytest.mark.parametrize("scans,cls_token,global_pool", READOUTS)
def test_features_head_split_is_the_forward(scans, cls_token, global_pool):
    model = classifier(scans=scans, cls_token=cls_token, global_pool=global_pool)
    x = images()
    outputs, _ = blocks_by_hand(model, x)
    tokens = model.norm(outputs[-1])
    features = model.forward_features(x)
    torch.testing.assert_close(features, tokens, rtol=0, atol=0)
    cls_index = model.cls_index
    pooled = tokens[:, patch_positions(cls_index)].mean(dim=1) if global_pool else tokens[:, cls_index]
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), pooled, rtol=0, atol=0)
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
    assert model.num_features == 32 and model.get_classifier() is model.head


@pytest.mark.parametrize("scans,cls_token,global_pool", READOUTS)
def test_forward_intermediates_match_the_blocks_by_hand(scans, cls_token, global_pool):
    model = classifier(scans=scans, cls_token=cls_token, global_pool=global_pool)
    x = images()
    outputs, maps = blocks_by_hand(model, x)
    final, got = model.forward_intermediates(x)
    assert [m.shape for m in got] == [(2, 32, GRID, GRID)] * 3
    for mine, theirs in zip(got, maps, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)

    # The last two blocks, normed, as (B, H/p * W/p, dim).
    got = model.forward_intermediates(x, indices=2, norm=True, output_fmt="NLC", intermediates_only=True)
    normed = [model.norm(m.flatten(2).transpose(1, 2)) for m in maps[1:]]
    assert len(got) == 2
    for mine, theirs in zip(got, normed, strict=True):
        torch.testing.assert_close(mine, theirs)

    # Blocks by index (negative from the end), in block order; stopping early ends at the last of them.
    final, got = model.forward_intermediates(x, indices=[-3, 1], stop_early=True)
    for mine, theirs in zip(got, maps[:2], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    torch.testing.assert_close(final, model.norm(outputs[1]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"indices": 4}, r"indices=4 asks for the last 4 blocks; the model has 1..3"),
        ({"indices": [0, 3]}, r"block indices must lie in -3..2"),
        ({"indices": []}, r"block indices must lie in"),
        ({"output_fmt": "NHWC"}, r"output_fmt='NHWC' is not one of 'NCHW', 'NLC'"),
    ],
)
def test_forward_intermediates_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        classifier().forward_intermediates(images(), **kwargs)


def test_prune_intermediate_layers_keeps_the_chosen_maps():
    model = classifier(cls_token="middle")
    x = images()
    _, maps = blocks_by_hand(model, x)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(model.encoder.blocks) == 2 and model.num_classes == 0
    got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for mine, theirs in zip(got, maps[:2], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_reset_classifier_replaces_the_head_and_the_config():
    model = classifier(cls_token="middle")
    x = images()
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    assert model.cfg.num_classes == 7 and model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model.head.weight.dtype == torch.float64 and model.head.weight.std() < 1e-4  # head_init_std
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)

    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)  # no head: the pooled features

    model.reset_classifier(0, global_pool="avg")
    tokens = model.forward_features(x)
    torch.testing.assert_close(model(x), tokens[:, patch_positions(model.cls_index)].mean(dim=1))
    with pytest.raises(ValueError, match="needs global_pool=True"):
        classifier(cls_token="none", global_pool=True).reset_classifier(3, global_pool="token")


GROUPED = {
    "middle": lambda: classifier(cls_token="middle"),
    "pooled": lambda: classifier(cls_token="none", global_pool=True, scans=1),
    "star": lambda: create_model(
        "star_tiny",
        img_size=16,
        patch_size=4,
        dim=32,
        depth=2,
        images_per_sequence=1,
        cluster_size=2,
        separator_value="embedding",
    ),
}


@pytest.mark.parametrize("kind", sorted(GROUPED))
def test_group_matcher_gives_the_layer_ids(kind):
    model = GROUPED[kind]()
    depth = len(model.encoder.blocks)
    expected = {}
    for name, _ in model.named_parameters():
        if name.startswith("encoder.blocks."):
            expected[name] = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.", "cls_token", "separator_pos_embed", "separator_value_token")):
            expected[name] = 0  # the stem: patch and position embeddings, class and separator tokens
        else:
            expected[name] = depth + 1  # the head: norm, classifier, STAR's decoder
    assert layer_ids(model) == (expected, depth + 2)
    for coarse in (False, True):
        assert model.group_matcher(coarse=coarse) == model.group_matcher()


def test_no_weight_decay_is_what_the_optimizer_exempts():
    model = create_model("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=2, cls_token="middle")
    exempt = model.no_weight_decay()
    assert {"cls_token", "encoder.pos_embed", "encoder.blocks.1.mixer.directions.3.A_log"} <= exempt
    assert "encoder.blocks.1.mixer.in_proj.weight" not in exempt and "head.weight" not in exempt
    undecayed = {name for group in param_groups(model, 0.05) if group["weight_decay"] == 0 for name in group["names"]}
    assert exempt == undecayed


def test_pretrained_cfg_is_timms_data_config():
    model = create_model("mambamlp_tiny", img_size=48, patch_size=4, dim=32, depth=2, num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "mambamlp_tiny" and model.default_cfg == cfg
    assert cfg["input_size"] == (3, 48, 48) and cfg["num_classes"] == 10 and cfg["classifier"] == "head"
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bicubic", 0.875, "center")
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    model.pretrained_cfg = {"mean": [0.5] * 3, "label_names": ["a", "b"]}
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["label_names"] == ("a", "b")
    assert model.pretrained_cfg["input_size"] == (3, 48, 48) and model.pretrained_cfg["crop_pct"] == 0.875
    model.reset_classifier(4)  # the head's class count follows; names of the old classes are dropped
    assert model.pretrained_cfg["num_classes"] == 4 and "label_names" not in model.pretrained_cfg


# timm's semantics, as timm documents them, written out here (timm itself is not a dependency):
# - global_pool: 'avg' reads the mean of the patch tokens (prefix tokens left out), 'token' the class
#   token, '' no pooling: forward_head then applies the head to every token, (B, L, classes), and
#   pre_logits gives the tokens (B, L, dim). Any other name is refused. create_model drops keyword
#   arguments that are None (the model's default stays); reset_classifier(n, None) keeps the pooling.
# - create_model(pretrained=True) loads published weights; pretrained_cfg is a plain dict on the model.
# - features_only=True gives a module returning a list of (B, C, H, W) maps of the blocks out_indices
#   (for ViTs an int n means the last n blocks, 3 by default), with feature_info.channels() and
#   .reduction() listing each map's channels and stride in input pixels.
# - list_models(filter) keeps the names matching the shell-style wildcard(s), minus exclude_filters.

POOLED = {
    "avg": lambda tokens, model: tokens[:, patch_positions(model.cls_index)].mean(dim=1),
    "token": lambda tokens, model: tokens[:, model.cls_index],
    "": lambda tokens, model: tokens,
}


def tiny(**overrides):
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, dim=32, depth=3, num_classes=5, cls_token="middle") | overrides
    model = create_model("mambamlp_tiny", **options).double().eval()
    with torch.no_grad():
        model.head.weight.normal_()
    return model


@pytest.mark.parametrize("global_pool", ["avg", "token", ""])
def test_create_model_global_pool_reads_what_timm_names(global_pool):
    model = tiny(global_pool=global_pool)
    x = images()
    tokens = model.forward_features(x)
    pooled = POOLED[global_pool](tokens, model)
    assert model.global_pool == global_pool
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled, rtol=0, atol=0)
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
    if global_pool == "":
        assert model(x).shape == (2, GRID * GRID + 1, 5)  # every token classified


def test_create_model_global_pool_none_is_the_default_and_others_are_refused():
    assert tiny(global_pool=None).global_pool == "avg" == tiny().global_pool  # ClassifierConfig's default
    for name in ("max", "avgmax", "cls", "map"):
        with pytest.raises(ValueError, match=f"global_pool='{name}' is not one of True / 'avg'"):
            tiny(global_pool=name)


@pytest.mark.parametrize("global_pool", ["avg", "token", ""])
def test_reset_classifier_global_pool_reads_what_timm_names(global_pool):
    model = tiny(global_pool="token" if global_pool == "avg" else "avg").double()
    model.reset_classifier(3, global_pool)
    model.head.double()
    x = images()
    tokens = model.forward_features(x)
    assert model.global_pool == global_pool and model.head.out_features == 3
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), POOLED[global_pool](tokens, model))
    model.reset_classifier(2)  # None keeps the pooling
    assert model.global_pool == global_pool
    for name in ("max", True, "cls"):
        with pytest.raises(ValueError, match=r"global_pool=.* is not one of 'avg', 'token', ''"):
            model.reset_classifier(2, name)
    assert model.global_pool == global_pool and model.head.out_features == 2  # a refusal changes nothing


def test_pretrained_true_says_no_weights_are_published_and_how_to_pass_a_folder():
    with pytest.raises(
        ValueError, match=r"no pretrained weights are published for mambamlp_base: pass pretrained=FOLDER"
    ):
        create_model("mambamlp_base", pretrained=True)
    assert list_models(pretrained=True) == []


@pytest.mark.parametrize("learnable", [True, False])
def test_pretrained_folder_at_another_img_size_resamples_the_position_embedding(tmp_path, learnable):
    saved = tiny(learnable_pos_embed=learnable).float()
    with torch.no_grad():
        saved.encoder.pos_embed.add_(0.1)  # weights no fresh model has
    saved.save_pretrained(tmp_path)
    model = create_model("mambamlp_tiny", pretrained=tmp_path, img_size=24)  # 4 x 4 patches -> 6 x 6
    assert model.cfg.img_size == 24 and model.pretrained_cfg["input_size"] == (3, 24, 24)
    old = saved.encoder.pos_embed.detach()
    if learnable:  # bicubic resampling of the 4 x 4 grid, channel by channel, written out here
        grid = old.reshape(1, GRID, GRID, 32).permute(0, 3, 1, 2)
        expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 32)
    else:  # a fixed sin-cos embedding is that of the new grid
        expected = sincos_2d(32, 6, 6)[None]
    torch.testing.assert_close(model.encoder.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    for key, value in saved.state_dict().items():
        if key != "encoder.pos_embed":
            assert torch.equal(model.state_dict()[key], value), key
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 5)


def star_encoder(tmp_path):
    """A STAR model (one scan, 16 px, 4 px patches) saved as a Hub folder, as a run folder and as a file."""
    torch.manual_seed(0)
    star = create_model("star_tiny", img_size=16, patch_size=4, dim=32, depth=3, images_per_sequence=1,
                        cluster_size=2, decoder_dim=32, decoder_head_dim=16)  # fmt: skip
    with torch.no_grad():
        for tensor in star.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    star.save_pretrained(tmp_path / "hub")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": star.cfg.to_dict(), "data_path": "synthetic"}))
    export_weights(run / "model.safetensors", star.state_dict(), "star_tiny", star.cfg.to_dict())
    return star, [tmp_path / "hub", run, run / "model.safetensors"]


def test_a_classifier_from_a_pretraining_folder_gets_its_encoder_as_finetune_does(tmp_path):
    star, sources = star_encoder(tmp_path)
    # ARM's .pth names of the same encoder: layers.i.*, one scan direction without a suffix.
    arm = {}
    for key, value in star.state_dict().items():
        if key.startswith("encoder."):
            key = key.removeprefix("encoder.").replace("blocks.", "layers.").replace("directions.0.", "")
            arm[key] = value
    torch.save({"model": arm}, tmp_path / "arm.pth")
    for source in [*sources, tmp_path / "arm.pth"]:
        torch.manual_seed(1)
        model = create_model("mambamlp_tiny", pretrained=source, img_size=24, patch_size=4, dim=32, depth=3)
        state = model.state_dict()
        for key, value in star.state_dict().items():
            if key.startswith("encoder.blocks."):  # every scan direction starts as the pretrained one
                for direction in range(4):
                    assert torch.equal(state[key.replace("directions.0.", f"directions.{direction}.")], value)
        grid = star.encoder.pos_embed.detach().reshape(1, GRID, GRID, 32).permute(0, 3, 1, 2)
        resized = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
        torch.testing.assert_close(state["encoder.pos_embed"], resized.permute(0, 2, 3, 1).reshape(1, 36, 32))
        torch.manual_seed(1)
        fresh = create_model("mambamlp_tiny", img_size=24, patch_size=4, dim=32, depth=3)
        assert torch.equal(state["head.weight"], fresh.state_dict()["head.weight"])  # the head stays fresh
    with pytest.raises(ValueError, match=r"shape mismatch.*pass the encoder's options"):
        create_model("mambamlp_tiny", pretrained=sources[1], patch_size=4, dim=64, depth=3)


def test_features_only_returns_the_maps_of_out_indices_with_their_feature_info():
    model = tiny(depth=4)
    x = images()
    maps = model.forward_intermediates(x, intermediates_only=True)  # every block, (B, dim, 4, 4)
    torch.manual_seed(0)
    for out_indices, blocks in ((3, [1, 2, 3]), ((0, 2), [0, 2]), ([-1], [3])):
        extractor = create_model("mambamlp_tiny", img_size=16, patch_size=4, dim=32, depth=4, cls_token="middle",
                                 features_only=True, out_indices=out_indices)  # fmt: skip
        wanted = extractor.state_dict().keys()
        extractor.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items() if f"model.{k}" in wanted})
        got = extractor.double().eval()(x)
        assert isinstance(got, list) and len(got) == len(blocks)
        for mine, block in zip(got, blocks, strict=True):
            assert mine.shape == (2, 32, GRID, GRID)
            torch.testing.assert_close(mine, maps[block], rtol=0, atol=0)
        assert extractor.feature_info.channels() == [32] * len(blocks)
        assert extractor.feature_info.reduction() == [4] * len(blocks)
        assert extractor.feature_info.module_name() == [f"encoder.blocks.{b}" for b in blocks]
        assert len(extractor.model.encoder.blocks) == blocks[-1] + 1  # later blocks pruned
    with pytest.raises(ValueError, match="features_only is for the mambamlp_"):
        create_model("star_tiny", features_only=True)


def test_list_models_filters_by_wildcards():
    assert list_models("mambamlp_*") == [f"mambamlp_{s}" for s in ("tiny", "small", "base", "large", "huge")]
    assert list_models(["*_tiny", "star_h*"]) == ["mambamlp_tiny", "star_tiny", "star_huge"]
    assert list_models("star_*", exclude_filters=["*large", "*huge"]) == ["star_tiny", "star_small", "star_base"]
    assert list_models("vit_*") == [] and len(list_models()) == 10


def test_pretrained_cfg_is_a_plain_dict_that_keeps_edits(tmp_path):
    model = tiny()
    cfg = model.pretrained_cfg
    assert type(cfg) is dict and model.pretrained_cfg is cfg and model.default_cfg is cfg
    cfg["crop_pct"] = 1.0
    cfg["mean"] = (0.25, 0.25, 0.25)
    assert model.pretrained_cfg["crop_pct"] == 1.0
    model.float().save_pretrained(tmp_path)
    loaded = create_model("mambamlp_tiny", pretrained=tmp_path).pretrained_cfg
    assert loaded["crop_pct"] == 1.0 and loaded["mean"] == (0.25, 0.25, 0.25)


def saved_bytes(model, run) -> tuple[object, int]:
    """``run()``'s output and the bytes of the activations it keeps for its backward pass (distinct storages;
    ``model``'s parameters left out)."""
    storages, parameters = {}, {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("family", ["mambamlp", "star"])
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_less(family, monkeypatch):
    overrides = dict(img_size=16, patch_size=4, dim=32, depth=3, drop_path=0.3)
    if family == "star":
        overrides |= dict(cluster_size=2, images_per_sequence=2, decoder_dim=32, decoder_head_dim=16)
    torch.manual_seed(0)
    model = create_model(f"{family}_tiny", **overrides).double().train()
    x = images(4)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(3)  # the same drop-path draws, which the recomputation must replay
        out, kept = saved_bytes(model, lambda: model(x))
        loss = out.loss if family == "star" else out.pow(2).mean()
        loss.backward()
        parameters = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), parameters, kept))
    (loss, grads, kept), (loss_ckpt, grads_ckpt, kept_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    assert kept_ckpt < 0.6 * kept  # the encoder's activations go; STAR's decoder keeps its own
    # Without gradients nothing is recorded, so nothing is checkpointed.
    monkeypatch.setattr("starmamba.models.backbone.checkpoint", lambda *args, **kwargs: pytest.fail("checkpointed"))
    with torch.no_grad():
        model(x)
