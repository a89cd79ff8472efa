"""ONNX export of classifiers (``starmamba export --onnx``): export time (wall and CPU: the export traces the
reference scan step by step, so it grows with tokens x blocks), file size, agreement with PyTorch and
inference images/s of onnxruntime beside PyTorch's (its default scan backend), on this machine's CPU.

    python benchmarks/onnx_export.py                              # the Fashion-MNIST geometry
    python benchmarks/onnx_export.py --models fashion mambamlp_tiny --batch 16 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Before torch: starmamba sets torch's OpenMP wait policy as the starmamba command has it.
import starmamba  # noqa: F401

# isort: split

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, print_table, write_json
from starmamba.models import create_model
from starmamba.ops import resolve_backend
from starmamba.train.export import export_onnx

# The classifier of `finetune --preset fashion_mnist`, and the presets at 224 px.
GEOMETRIES = {"fashion": ("mambamlp_tiny", dict(img_size=48, patch_size=4, dim=96, depth=6, num_classes=10))}


def build(name: str) -> torch.nn.Module:
    preset, options = GEOMETRIES.get(name, (name, {}))
    torch.manual_seed(0)
    model = create_model(preset, **options).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)  # logits of a trained head's size, not the initial 2e-5
    return model


def images_per_second(run, images: int, repeats: int) -> float:
    run()  # warm-up: JIT kernels, onnxruntime's first-run allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return images / best


def measure(name: str, batch: int, repeats: int) -> dict:
    model = build(name)
    channels, height, width = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        start, cpu = time.perf_counter(), time.process_time()
        difference = export_onnx(model, path)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        size = path.stat().st_size / 2**20
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(x).numpy()
            torch_rate = images_per_second(lambda: model(x), batch, repeats)
        (logits,) = session.run(None, {"images": x.numpy()})
        ort_rate = images_per_second(lambda: session.run(None, {"images": x.numpy()}), batch, repeats)
    return {
        "model": name,
        "tokens": model.cfg.grid**2 + 1,
        "depth": model.cfg.depth,
        "export_s": seconds,
        "export_cpu_s": cpu_seconds,
        "onnx_mb": size,
        "check_max_abs_diff": difference,
        "max_abs_diff": float(np.abs(logits - expected).max()),
        "torch_backend": resolve_backend(None, torch.device("cpu")),
        "torch_images_per_s": torch_rate,
        "onnxruntime_images_per_s": ort_rate,
        "batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fashion"], help="'fashion' or mambamlp_* presets")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_export.json")
    args = parser.parse_args()
    rows = [measure(name, args.batch, args.repeats) for name in args.models]
    print_table(
        rows,
        [("model", "model", "s"), ("tokens", "tokens", "d"), ("depth", "depth", "d"), ("export_s", "export s", ".1f"),
         ("export_cpu_s", "export CPU s", ".1f"), ("onnx_mb", "MB", ".1f"), ("max_abs_diff", "max |diff|", ".2g"),
         ("torch_backend", "torch scan", "s"), ("torch_images_per_s", "torch img/s", ".1f"),
         ("onnxruntime_images_per_s", "onnxruntime img/s", ".1f")],
    )  # fmt: skip
    write_json(args.out, {"environment": environment(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
