"""MambaMLP: presets, mixer directions, causality, initialisation and the 1-scan -> 4-scan conversion."""

import math

import pytest
import torch
import torch.nn.functional as F

import starmamba
from starmamba.models import ClassifierConfig, MambaMLPClassifier, create_model, model_config
from starmamba.models.backbone import MambaMLP
from starmamba.models.convert import classifier_state_from_pretrained
from starmamba.models.mixer import MambaMixer, scan_orders
from starmamba.models.pos_embed import resize_pos_embed, sincos_2d
from starmamba.ops import selective_scan

# Pinned parameter counts. Base is paper Table 7's 85M (ARM: 85.0M), Large 297M, Huge 663M.
PARAMS = {
    "mambamlp_tiny": 5_996_776,
    "mambamlp_small": 22_167_016,
    "mambamlp_base": 85_030_888,
    "mambamlp_large": 297_034_696,
    "mambamlp_huge": 662_680_552,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_list_models_and_unknown_names():
    assert "mambamlp_base" in starmamba.list_models() and "star_huge" in starmamba.list_models()
    with pytest.raises(ValueError, match="did you mean mambamlp_base"):
        create_model("mambamlp_bsae")
    with pytest.raises(ValueError, match=r"unknown option.*drop_pth"):
        create_model("mambamlp_tiny", drop_pth=0.1)


def tiny_classifier(**overrides):
    cfg = dict(img_size=16, patch_size=4, dim=32, depth=2, num_classes=5) | overrides
    return MambaMLPClassifier(ClassifierConfig(**cfg))


def test_scan_orders_by_hand():
    # 2 x 2 patches, class token at the tail (index 4).
    orders = scan_orders(2, 2, cls_index=4)
    assert orders[:, 0].tolist() == [[4, 3, 2, 1, 0], [0, 2, 1, 3, 4], [4, 3, 1, 2, 0]]
    # Class token in the middle (index 2): patches sit at sequence positions 0, 1, 3, 4.
    orders = scan_orders(2, 2, cls_index=2)
    assert orders[:, 0].tolist() == [[4, 3, 2, 1, 0], [0, 3, 2, 1, 4], [4, 1, 2, 3, 0]]
    for order, inverse in orders:
        assert torch.equal(order[inverse], torch.arange(5))


def plain_direction(direction, x):
    """One scan direction written out plainly: causal conv, SiLU, projections, sequential scan."""
    length = x.shape[-1]
    u = F.silu(direction.conv1d(x)[..., :length])
    dt, B, C = direction.x_proj(u.transpose(1, 2)).split([direction.dt_rank, 16, 16], dim=-1)
    delta = direction.dt_proj(dt).transpose(1, 2)  # with its bias, instead of delta_bias
    return selective_scan(u, delta, -torch.exp(direction.A_log), B.transpose(1, 2), C.transpose(1, 2),
                          D=direction.D, delta_softplus=True, backend="reference")  # fmt: skip


def test_four_scan_mixer_is_the_average_of_four_directional_passes():
    """The definition, written out with flips and transposes the way ARM's v3 mixer does it."""
    torch.manual_seed(0)
    rows = cols = 3
    dim, cls = 8, 4  # class token in the middle of 9 patches
    mixer = MambaMixer(dim, scans=4)
    x = torch.randn(2, rows * cols + 1, dim)
    out = mixer(x, scan_orders(rows, cols, cls))

    inner, z = mixer.in_proj(x).chunk(2, dim=-1)
    inner = inner.transpose(1, 2)  # (b, d, l)

    def transpose_grid(t):
        patches = torch.cat([t[..., :cls], t[..., cls + 1 :]], dim=-1)
        patches = patches.reshape(*t.shape[:-1], rows, cols).transpose(-1, -2).reshape(*t.shape[:-1], -1)
        return torch.cat([patches[..., :cls], t[..., cls : cls + 1], patches[..., cls:]], dim=-1)

    d = mixer.directions
    y = plain_direction(d[0], inner) + plain_direction(d[1], inner.flip(-1)).flip(-1)
    col = transpose_grid(inner)
    y_col = plain_direction(d[2], col) + plain_direction(d[3], col.flip(-1)).flip(-1)
    y = y + transpose_grid(y_col)  # the grid transpose is its own inverse
    expected = mixer.out_proj((y.transpose(1, 2) / 4) * F.silu(z))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_one_scan_mixer_matches_the_plain_direction():
    torch.manual_seed(0)
    mixer = MambaMixer(8, scans=1)
    x = torch.randn(2, 11, 8)
    inner, z = mixer.in_proj(x).chunk(2, dim=-1)
    expected = mixer.out_proj(plain_direction(mixer.directions[0], inner.transpose(1, 2)).transpose(1, 2) * F.silu(z))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-6)


def test_one_scan_trunk_is_causal():
    torch.manual_seed(0)
    cfg = model_config("star_tiny", img_size=16, patch_size=4, dim=32, depth=2, images_per_sequence=1)
    trunk = MambaMLP(cfg).eval()
    x = torch.randn(2, 40, 32)
    base, _ = trunk(x, None)
    for t in (0, 17, 39):
        changed = x.clone()
        changed[:, t] += torch.randn(32)  # not a constant shift, which LayerNorm would remove
        out, _ = trunk(changed, None)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("scans", [1, 4])
def test_only_four_scans_let_the_first_token_see_the_last(scans):
    torch.manual_seed(0)
    model = tiny_classifier(cls_token="tail", scans=scans).eval()
    with torch.no_grad():  # long memory, so that the effect stands far above rounding
        for block in model.encoder.blocks:
            for direction in block.mixer.directions:
                direction.A_log.fill_(math.log(0.01))
                direction.dt_proj.bias.fill_(0.5)
    x = torch.randn(1, model.encoder.pos_embed.shape[1] + 1, 32)
    base, _ = model.encoder(x, model.scan_orders)
    changed = x.clone()
    changed[:, -1] += torch.randn(32)
    out, _ = model.encoder(changed, model.scan_orders)
    effect = (out[:, 0] - base[:, 0]).abs().max().item()
    if scans == 4:
        assert effect > 1e-3
    else:
        assert effect == 0.0


def test_mixer_initialisation():
    torch.manual_seed(0)
    mixer = MambaMixer(64, scans=4)
    for direction in mixer.directions:
        assert torch.equal(direction.A_log, torch.log(torch.arange(1, 17.0)).repeat(64, 1))
        assert torch.equal(direction.D, torch.ones(64))
        dt = F.softplus(direction.dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        assert direction.dt_rank == math.ceil(64 / 16)
        assert direction.x_proj.out_features == 4 + 2 * 16
    assert mixer.in_proj.bias is None and mixer.out_proj.bias is None


def test_classifier_head_and_out_proj_initialisation():
    torch.manual_seed(0)
    model = tiny_classifier(dim=64, num_classes=100)
    assert model.head.weight.std() < 1e-4 and torch.equal(model.head.bias, torch.zeros(100))
    # ARM scales every mixer's out_proj by 1/sqrt(depth) after PyTorch's default init.
    bound = 1 / math.sqrt(64) / math.sqrt(2)
    assert model.encoder.blocks[0].mixer.out_proj.weight.abs().max() <= bound


@pytest.mark.parametrize(
    "cls_token,global_pool,read",
    [
        ("tail", False, [16]),  # 4 x 4 patches: the class token is token 16...
        ("middle", False, [8]),  # ... or token 8
        ("middle", True, [*range(8), *range(9, 17)]),  # the mean of the patches, not the class token
        ("tail", True, list(range(16))),
        ("none", True, list(range(16))),
    ],
)
def test_classifier_reads_the_tokens_its_readout_names(cls_token, global_pool, read):
    torch.manual_seed(0)
    model = tiny_classifier(cls_token=cls_token, global_pool=global_pool, num_classes=0).eval()
    seen = []
    model.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    features = model(torch.randn(3, 3, 16, 16))
    tokens = seen[0]
    assert tokens.shape == (3, 16 + (cls_token != "none"), 32)
    torch.testing.assert_close(features, tokens[:, read].mean(dim=1), rtol=0, atol=1e-6)


def test_classifier_reads_the_mean_of_the_patches_by_default():
    assert ClassifierConfig().global_pool  # ARM's finetuning recipe (--global_pool)


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 16, 16\), got \(2, 3, 20, 20\)"):
        tiny_classifier()(torch.randn(2, 3, 20, 20))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"img_size": 20}, "img_size=20 is not a multiple of patch_size=16"),
        ({"scans": 2}, "scans=2"),
        ({"cls_token": "head"}, "cls_token='head'"),
        ({"cls_token": "none", "global_pool": False}, "needs global_pool=True"),
        ({"drop_path": 1.5}, "drop_path=1.5"),
    ],
)
def test_invalid_classifier_options(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_config("mambamlp_tiny", **overrides)


def test_sincos_by_hand():
    emb = sincos_2d(4, 2, 3)  # one frequency (1.0) per axis: [sin col, cos col, sin row, cos row]
    row, col = 1, 2
    expected = torch.tensor([math.sin(col), math.cos(col), math.sin(row), math.cos(row)])
    torch.testing.assert_close(emb[row * 3 + col], expected)


def test_resize_pos_embed_keeps_constants_and_shapes():
    pos = torch.full((1, 144, 8), 0.5)
    resized = resize_pos_embed(pos, (14, 14))
    assert resized.shape == (1, 196, 8)
    torch.testing.assert_close(resized, torch.full((1, 196, 8), 0.5))
    assert resize_pos_embed(pos, (12, 12)) is pos


def test_one_scan_checkpoint_converts_to_four_scans():
    torch.manual_seed(0)
    star = create_model("star_tiny", img_size=16, patch_size=4, dim=32, depth=2, images_per_sequence=1)
    classifier = tiny_classifier(img_size=20, num_classes=3)  # a 5x5 grid instead of 4x4
    state = classifier_state_from_pretrained(star.state_dict(), classifier)
    classifier.load_state_dict(state, strict=True)
    source = star.state_dict()
    for block in range(2):
        prefix = f"encoder.blocks.{block}.mixer."
        for k in range(4):
            for leaf in (
                "conv1d.weight",
                "conv1d.bias",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "A_log",
                "D",
            ):
                got = classifier.state_dict()[f"{prefix}directions.{k}.{leaf}"]
                assert torch.equal(got, source[f"{prefix}directions.0.{leaf}"]), (k, leaf)
        assert torch.equal(classifier.state_dict()[prefix + "in_proj.weight"], source[prefix + "in_proj.weight"])
    expected_pos = resize_pos_embed(source["encoder.pos_embed"], (5, 5))
    torch.testing.assert_close(classifier.encoder.pos_embed.data, expected_pos)
    assert classifier.encoder.pos_embed.requires_grad  # learnable for finetuning


def test_conversion_refuses_another_model():
    star = create_model("star_tiny", img_size=16, patch_size=4, dim=32, depth=2, images_per_sequence=1)
    wider = tiny_classifier(dim=64)
    with pytest.raises(ValueError, match="shape mismatch"):
        classifier_state_from_pretrained(star.state_dict(), wider)
    deeper = tiny_classifier(depth=3)
    with pytest.raises(ValueError, match=r"\d+ missing: blocks\.2\."):
        classifier_state_from_pretrained(star.state_dict(), deeper)
    with pytest.raises(ValueError, match="no encoder"):
        classifier_state_from_pretrained({"head.weight": torch.zeros(1)}, wider)
