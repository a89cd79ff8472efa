"""Shared fixtures: where the real Fashion-MNIST is, failing instead of skipping when CI requires it."""

import os

# Triton decides at kernel-definition time whether to interpret, so this must precede any import of
# starmamba.ops.scan_triton: it lets the Triton scan run (and be tested) on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest

from starmamba.data.datasets import FASHION_MNIST_DEFAULT_DIR, FASHION_MNIST_DIR_ENV


@pytest.fixture
def fashion_mnist_dir() -> Path:
    """The folder of the real Fashion-MNIST IDX files; skipped when absent unless STARMAMBA_REQUIRE_DATA is set."""
    root = Path(os.environ.get(FASHION_MNIST_DIR_ENV, FASHION_MNIST_DEFAULT_DIR))
    if not any(root.glob("train-images-idx3-ubyte*")):
        if os.environ.get("STARMAMBA_REQUIRE_DATA"):
            pytest.fail(f"STARMAMBA_REQUIRE_DATA is set but Fashion-MNIST is missing from {root}")
        pytest.skip(f"Fashion-MNIST not installed at {root} (Debian package dataset-fashion-mnist)")
    return root
