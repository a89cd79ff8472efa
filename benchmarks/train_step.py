"""Images per second of a full training step (forward, backward, AdamW) per scan backend.

Cases: the small-scale STAR and ARM pretraining and finetuning of ``starmamba.experiments.recipes``
(24 px, 96 wide, 6 blocks, batch 64) and the paper's ``star_base`` (192 px, 8 images per
sequence) and ``mambamlp_base`` (224 px). In each case the backends take turns step by step in one
process (``STARMAMBA_SCAN_BACKEND`` is read at every scan), so a noisy spell of the machine hits
them alike; the median step time is reported, with each backend's speed-up over ``chunked``.

    python benchmarks/train_step.py                       # every case, default backend vs chunked
    python benchmarks/train_step.py --cases finetune_small --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Before torch: starmamba sets torch's OpenMP wait policy as the starmamba command has it.
import starmamba  # noqa: F401

# isort: split

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, environment, print_table, write_json
from starmamba.experiments.recipes import SMALL_ARCH, SMALL_DECODER
from starmamba.models import create_model
from starmamba.ops import BACKEND_ENV, resolve_backend
from starmamba.train.precision import autocast

# name -> (model factory, images per step, image size, is a classifier)
CASES: dict[str, tuple[Callable[[], torch.nn.Module], int, int, bool]] = {
    "star_small": (lambda: create_model("star_tiny", **SMALL_ARCH, **SMALL_DECODER, cluster_size=2), 64, 24, False),
    "arm_small": (
        lambda: create_model(
            "star_tiny", **SMALL_ARCH, **SMALL_DECODER, cluster_size=2, images_per_sequence=1, separator="none"
        ),
        64,
        24,
        False,
    ),
    "finetune_small": (lambda: create_model("mambamlp_tiny", **SMALL_ARCH, num_classes=10), 64, 24, True),
    "star_base": (lambda: create_model("star_base"), 8, 192, False),
    "mambamlp_base": (lambda: create_model("mambamlp_base"), 4, 224, True),
}


def step_seconds(model, optimizer, images, labels, classifier: bool, device: torch.device) -> float:
    """Time one optimizer step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with autocast(device):
        out = model(images)
        loss = F.cross_entropy(out, labels) if classifier else out.loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def run_case(name: str, backends: list[str], steps: int, device: torch.device) -> list[dict]:
    """Median images/s of each backend on one case, the backends alternating step by step."""
    factory, batch, size, classifier = CASES[name]
    torch.manual_seed(0)
    model = factory().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    times: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(steps + 1):  # the first round warms up (and compiles the JIT kernels)
        for backend in backends:
            os.environ[BACKEND_ENV] = backend
            seconds = step_seconds(model, optimizer, images, labels, classifier, device)
            if i:
                times[backend].append(seconds)
    os.environ.pop(BACKEND_ENV, None)
    rows = [{"case": name, "backend": b, "batch": batch, "img_per_s": batch / statistics.median(times[b])}
            for b in backends]  # fmt: skip
    chunked = next((r["img_per_s"] for r in rows if r["backend"] == "chunked"), None)
    for row in rows:
        row["x_chunked"] = row["img_per_s"] / chunked if chunked else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--backends", nargs="+", default=None, help="default: this device's default and chunked")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend (base models: a fifth)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.environ.pop(BACKEND_ENV, None)
    backends = args.backends or list(dict.fromkeys([resolve_backend(None, device), "chunked"]))
    rows = []
    for name in args.cases:
        steps = max(2, args.steps // 5) if name.endswith("_base") else args.steps
        rows.extend(run_case(name, backends, steps, device))
        for row in rows[-len(backends) :]:
            print(f"  {name:15s} {row['backend']:10s} {row['img_per_s']:8.1f} img/s", flush=True)
    print(f"\ntraining step (forward, backward, AdamW), {device_name(device)}")
    print_table(
        rows,
        [
            ("case", "case", "s"),
            ("batch", "batch", "d"),
            ("backend", "backend", "s"),
            ("img_per_s", "img/s", ".1f"),
            ("x_chunked", "x chunked", ".2f"),
        ],
    )
    write_json(args.out, {"benchmark": "train_step", **environment(device), "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
