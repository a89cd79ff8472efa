"""The STAR sequence layout against hand-computed expectations."""

import pytest
import torch

from starmamba.models.layout import SequenceLayout


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
    ],
)
def test_invalid_layouts_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SequenceLayout(**kwargs)


def test_rectangular_grid_with_sc_is_fine():
    layout = SequenceLayout(grid=(8, 12), cluster=4, images_per_sequence=1)
    assert layout.cluster_grid == (2, 3)
    assert layout.num_tokens == 16 * 7
