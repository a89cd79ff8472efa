"""Paired comparisons between methods over seeds."""

import pytest

from starmamba.experiments.reports import noise_verdict, paired_difference


def test_paired_difference_by_hand():
    diff = paired_difference([80.0, 82.0, 81.0], [78.0, 81.0, 77.0])
    assert diff["differences"] == [2.0, 1.0, 4.0]
    assert diff["mean"] == pytest.approx(7 / 3)
    # deviations -1/3, -4/3, 5/3: squares sum to 42/9, over n - 1 = 2 -> 7/3
    assert diff["std"] == pytest.approx((7 / 3) ** 0.5)
    assert diff["seeds"] == 3


def test_paired_noise_is_smaller_than_unpaired_when_seeds_move_both_methods():
    # Seed effects shared by both methods cancel in the paired differences.
    diff = paired_difference([70.0, 80.0, 90.0], [69.0, 79.0, 89.5])
    # differences 1, 1, 0.5: deviations 1/6, 1/6, -1/3, squares sum 1/6, over 2 -> sqrt(1/12)
    assert diff["std"] == pytest.approx((1 / 12) ** 0.5)
    assert "larger than the noise" in noise_verdict("STAR - ARM", "k-NN top-1", diff)


def test_verdicts():
    within = paired_difference([80.0, 81.0], [80.5, 79.5])  # differences -0.5, 1.5: mean 0.5, std 1.414
    assert noise_verdict("A - B", "top-1", within) == (
        "A - B, top-1: +0.50 points ± 1.41 (paired std over 2 seeds): within the noise"
    )
    one = paired_difference([80.0], [75.0])
    assert one["std"] is None
    assert "noise unmeasured" in noise_verdict("A - B", "top-1", one)


def test_unpaired_lists_are_refused():
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        paired_difference([], [])
