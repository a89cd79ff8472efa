"""The STAR sequence layout against hand-computed expectations."""

import pytest
import torch

from starmamba.models.layout import TARGET_GROUPS, SequenceLayout


def unit_names(layout, image=0):
    return layout.describe(image).split()


def test_paper_geometry_token_counts():
    # 192 px, patch 16 -> 12 x 12 patches; cluster 4 x 4 -> 9 clusters + one separator cluster.
    for images, tokens in [(1, 160), (2, 320), (4, 640), (8, 1280), (16, 2560)]:
        layout = SequenceLayout(grid=12, cluster=4, images_per_sequence=images)
        assert layout.tokens_per_image == 160
        assert layout.num_tokens == tokens
        # Every unit is a source: the last cluster predicts the next image's separator.
        assert layout.num_queries == tokens


def test_arm_is_one_image_without_separator():
    arm = SequenceLayout(grid=12, cluster=4, images_per_sequence=1, separator="none")
    assert arm.num_tokens == 128  # clusters 1..8
    assert arm.num_queries == 128  # clusters 2..9
    assert [(p.source, p.target) for p in arm.predictions] == [(i, i + 1) for i in range(8)]
    assert arm.trailing_separator is None
    # The encoder sees cluster 0 first: patches 0-3, 12-15, 24-27, 36-39.
    assert arm.token_patch[:16].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27, 36, 37, 38, 39]
    # ...and the first query predicts cluster 1: patches 4-7, 16-19, ...
    assert arm.query_patch[:4].tolist() == [4, 5, 6, 7]
    assert arm.query_patch[4:8].tolist() == [16, 17, 18, 19]


def test_unit_order_of_each_position_on_a_small_grid():
    # 4 x 4 patches, 2 x 2 clusters -> a 2 x 2 cluster grid.
    def names(position):
        return unit_names(SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position=position))

    assert names("SC") == ["S", "C0", "C1", "C2", "C3"]
    assert names("CS") == ["C0", "C1", "C2", "C3", "S"]
    assert names("SCS") == ["S", "C0", "C1", "S", "C2", "C3"]
    assert names("CSC") == ["C0", "C1", "S", "C2", "C3", "S"]


def test_what_is_predicted_under_each_position():
    def targets(position):
        layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position=position)
        return [
            (layout.target_unit(p).kind[0], layout.target_unit(p).image, layout.target_unit(p).cluster)
            for p in layout.predictions
        ]

    # SC: every cluster of every image is predicted; the last cluster predicts a separator.
    sc = targets("SC")
    assert sc == [("c", 0, 0), ("c", 0, 1), ("c", 0, 2), ("c", 0, 3), ("s", 1, -1),
                  ("c", 1, 0), ("c", 1, 1), ("c", 1, 2), ("c", 1, 3), ("s", 2, -1)]  # fmt: skip
    # CS: the first cluster of the first image is never predicted, and the final separator
    # predicts nothing (the next image's first cluster is unknown), so it is not fed.
    cs = targets("CS")
    assert cs[0] == ("c", 0, 1)
    assert ("c", 0, 0) not in cs and ("c", 1, 0) in cs
    assert len(cs) == 9
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position="CS")
    assert layout.num_tokens == 9 * 4 and layout.encoder_units[-1].kind == "cluster"
    # SCS: two separators per image, all clusters predicted, trailing separator predicted.
    assert len(targets("SCS")) == 12
    # CSC: first cluster unpredicted, last separator dropped.
    assert len(targets("CSC")) == 11


def test_decoder_mask_is_block_causal():
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position="SC")
    mask = layout.decoder_mask
    assert mask.shape == (layout.num_queries, layout.num_tokens) == (40, 40)
    # Units are 4 tokens each here; query block q (predicting unit q+1) sees token blocks 0..q.
    blocks = mask.view(10, 4, 10, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # constant inside each 4x4 block
    expected = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    assert torch.equal(blocks[:, 0, :, 0], expected)


def test_mask_with_token_separators_has_unequal_blocks():
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=1, separator="token")
    # units: S(1 token) C0 C1 C2 C3 (4 each); trailing separator predicted from C3.
    assert layout.num_tokens == 17
    assert layout.num_queries == 4 * 4 + 1
    mask = layout.decoder_mask
    assert mask[:4].sum(1).tolist() == [1, 1, 1, 1]  # predicting C0 from the separator alone
    assert mask[4:8].sum(1).tolist() == [5] * 4  # C1 from S + C0
    assert mask[-1].sum().item() == 17  # the trailing separator sees everything


# The units each prediction may see under decoder_context="image", as (first, last) unit indices of
# the stream, worked out by hand for 2 images of 2 x 2 clusters. A prediction belongs to its target's
# image (a cluster) or its source's image (a separator); an image's context opens at the earliest
# source among its predictions.
IMAGE_CONTEXT = {
    # S C0 C1 C2 C3 | S C0 C1 C2 C3 | trailing S: image 1 opens at its own separator (unit 5).
    ("cluster", "SC"): [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (5, 5), (5, 6), (5, 7), (5, 8), (5, 9)],
    ("token", "SC"): [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (5, 5), (5, 6), (5, 7), (5, 8), (5, 9)],
    # C0 C1 C2 C3 S | C0 C1 C2 C3 (S not fed): image 1's first cluster is predicted from image 0's
    # separator (unit 4), which opens image 1's context; image 0's separator target belongs to image 0.
    ("cluster", "CS"): [(0, 0), (0, 1), (0, 2), (0, 3), (4, 4), (4, 5), (4, 6), (4, 7), (4, 8)],
    # S C0 C1 S C2 C3 | S C0 C1 S C2 C3 | trailing S: separators inside an image belong to it.
    ("cluster", "SCS"): [(0, k) for k in range(6)] + [(6, k) for k in range(6, 12)],
    # C0 C1 S C2 C3 S | C0 C1 S C2 C3 (S not fed): image 1 opens at image 0's last separator (unit 5).
    ("cluster", "CSC"): [(0, k) for k in range(5)] + [(5, k) for k in range(5, 11)],
    # C0 C1 C2 C3 | C0 C1 C2 C3 (C3 not fed): image 1's first cluster only has image 0's last one.
    ("none", "SC"): [(0, 0), (0, 1), (0, 2), (3, 3), (3, 4), (3, 5), (3, 6)],
}


@pytest.mark.parametrize(("separator", "position"), list(IMAGE_CONTEXT))
def test_image_decoder_context_masks_match_hand_built_units(separator, position):
    layout = SequenceLayout(
        grid=4, cluster=2, images_per_sequence=2, separator=separator, separator_position=position,
        decoder_context="image",
    )  # fmt: skip
    sizes = [u.num_tokens for u in layout.encoder_units]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    rows = []
    for prediction, (first, last) in zip(layout.predictions, IMAGE_CONTEXT[separator, position], strict=True):
        row = torch.zeros(layout.num_tokens, dtype=torch.bool)
        row[offsets[first] : offsets[last + 1]] = True
        rows += [row] * layout.target_unit(prediction).num_tokens
    assert torch.equal(layout.decoder_mask, torch.stack(rows))


@pytest.mark.parametrize(("separator", "position"), list(IMAGE_CONTEXT))
def test_sequence_decoder_context_sees_every_earlier_unit(separator, position):
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator=separator, separator_position=position)
    image = SequenceLayout(
        grid=4, cluster=2, images_per_sequence=2, separator=separator, separator_position=position,
        decoder_context="image",
    )  # fmt: skip
    assert layout.decoder_context == "sequence"
    visible = layout.decoder_mask.sum(1)
    # Sequence context: every query of the prediction from unit i sees units 0..i (a prefix).
    assert torch.equal(layout.decoder_mask, torch.arange(layout.num_tokens)[None, :] < visible[:, None])
    # Image context sees a subset of that, strictly smaller for some query of the second image.
    assert torch.equal(image.decoder_mask & layout.decoder_mask, image.decoder_mask)
    assert (image.decoder_mask.sum(1) < visible).any()


@pytest.mark.parametrize("separator", ["none", "token", "cluster"])
def test_one_image_per_sequence_has_one_context(separator):
    layouts = [
        SequenceLayout(grid=12, cluster=4, images_per_sequence=1, separator=separator, decoder_context=context)
        for context in ("sequence", "image")
    ]
    assert torch.equal(layouts[0].decoder_mask, layouts[1].decoder_mask)


def test_target_groups_by_hand():
    # SC, 2 images of 2 x 2 clusters: C0 of each image is a first cluster; the separators of image 1
    # and of the trailing block are separator targets; 4 tokens a unit.
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position="SC")
    per_unit = ["first_cluster", "cluster", "cluster", "cluster", "separator"] * 2
    assert [TARGET_GROUPS[g] for g in layout.query_group[::4].tolist()] == per_unit
    # ARM: clusters 2..9 only, never a first cluster or a separator.
    arm = SequenceLayout(grid=12, cluster=4, images_per_sequence=1, separator="none")
    assert set(arm.query_group.tolist()) == {TARGET_GROUPS.index("cluster")}
    assert arm.target_groups == ("cluster",) and layout.target_groups == TARGET_GROUPS
    # No separator, 2 images: image 1's first cluster is a target (from image 0's last cluster).
    none = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator="none")
    assert [TARGET_GROUPS[g] for g in none.query_group[::4].tolist()] == ["cluster"] * 3 + ["first_cluster"] + [
        "cluster"
    ] * 3


def test_bank_indices_point_at_the_right_patches():
    layout = SequenceLayout(grid=4, cluster=2, images_per_sequence=2, separator_position="SC")
    # Bank: 2 images x 16 patches, then 4 separator tokens at 32..35.
    assert layout.encoder_index[:4].tolist() == [32, 33, 34, 35]  # separator of image 0
    assert layout.encoder_index[4:8].tolist() == [0, 1, 4, 5]  # cluster 0 of image 0
    assert layout.encoder_index[20:24].tolist() == [32, 33, 34, 35]  # separator of image 1
    assert layout.encoder_index[24:28].tolist() == [16, 17, 20, 21]  # cluster 0 of image 1
    assert layout.target_index[:4].tolist() == [0, 1, 4, 5]  # first target: cluster 0 of image 0
    assert layout.token_image.tolist() == [0] * 20 + [1] * 20
    assert layout.query_image[-4:].tolist() == [2] * 4  # the trailing separator opens "image 2"


def test_identity_pattern():
    layout = SequenceLayout(grid=12, cluster=4, separator_value="identity")
    pattern = layout.separator_pattern.view(4, 4)
    assert torch.equal(pattern, torch.eye(4))
    assert SequenceLayout(separator_value="ones").separator_pattern.tolist() == [1.0] * 16
    assert SequenceLayout(separator_value="zeros").separator_pattern.tolist() == [0.0] * 16
    assert SequenceLayout(separator="token", separator_value="identity").separator_pattern.tolist() == [1.0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"grid": 12, "cluster": 5}, "does not divide the grid"),
        ({"images_per_sequence": 0}, "images_per_sequence=0"),
        ({"grid": (12, 8), "cluster": 4, "separator_position": "SCS"}, "3 x 2 clusters"),
        ({"separator": "cluster2"}, "separator='cluster2'"),
        ({"separator_value": "twos"}, "separator_value='twos'"),
        ({"separator_position": "SS"}, "separator_position='SS'"),
        ({"cluster": 0}, "cluster=(0, 0)"),
        ({"decoder_context": "images"}, "decoder_context='images' is not one of 'sequence', 'image'"),
    ],
)
def test_invalid_layouts_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SequenceLayout(**kwargs)


def test_rectangular_grid_with_sc_is_fine():
    layout = SequenceLayout(grid=(8, 12), cluster=4, images_per_sequence=1)
    assert layout.cluster_grid == (2, 3)
    assert layout.num_tokens == 16 * 7
