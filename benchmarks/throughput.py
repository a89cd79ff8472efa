"""Throughput of the MambaMLP presets (paper Table 7), with a ViT of matching size as the reference.

For each ``mambamlp_*`` preset at 224 px: parameters, inference images/s and training images/s
(forward + backward + AdamW step), per scan backend available on the device (bf16 autocast on
CUDA, fp32 on CPU); and the same for a ViT of the same width and depth built from PyTorch's own
``nn.TransformerEncoderLayer``. Each measurement runs in a fresh process; a batch that does not fit
in memory is halved until it does.

    python benchmarks/throughput.py                                   # everything, this device
    python benchmarks/throughput.py --models mambamlp_base --backends chunked --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Before torch: starmamba sets torch's OpenMP wait policy as the starmamba command has it.
import starmamba  # noqa: F401

# isort: split

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, print_table, write_json
from starmamba.models import SIZES, create_model, list_models, model_config
from starmamba.ops import BACKEND_ENV, available_backends
from starmamba.train.precision import autocast


class ViT(nn.Module):
    """A plain pre-norm ViT classifier (class token, learned positions) from torch's own layers."""

    def __init__(self, dim: int, depth: int, img_size: int = 224, patch: int = 16, classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, dim // 64, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build(name: str) -> nn.Module:
    if name.startswith("vit_"):
        dim, depth = SIZES[name.removeprefix("vit_")]
        return ViT(dim, depth)
    return create_model(name)


def measure(name: str, mode: str, batch: int, steps: int, device: torch.device) -> float:
    """Images per second of ``steps`` timed iterations after one warm-up."""
    model = build(name).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = autocast(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            with amp:
                loss = nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), amp:
                model(images)

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - start)


def worker(name: str, mode: str, batch: int, args) -> dict:
    device = torch.device(args.device)
    while True:
        try:
            speed = measure(name, mode, batch, args.steps, device)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                return {"model": name, "mode": mode, "batch": 0, "images_per_s": None}
            batch //= 2
            torch.cuda.empty_cache()
    return {"model": name, "mode": mode, "batch": batch, "images_per_s": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=[m for m in list_models() if m.startswith("mambamlp")])
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend the device runs")
    parser.add_argument("--no_vit", action="store_true", help="skip the ViT reference")
    parser.add_argument("--infer_batch", type=int, default=256 if on_gpu else 8)
    parser.add_argument("--train_batch", type=int, default=128 if on_gpu else 4)
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 2)
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args)))
        return

    backends = args.backends or available_backends(torch.device(args.device))
    plan = [(m, b) for m in args.models for b in backends]
    if not args.no_vit:
        plan += [(f"vit_{m.split('_', 1)[1]}", "-") for m in args.models]
    rows = []
    for name, backend in plan:
        row = {"model": name, "backend": backend}
        if name.startswith("mambamlp"):
            with torch.device("meta"):
                row["params_m"] = sum(p.numel() for p in create_model(name).parameters()) / 1e6
            row["tokens"] = model_config(name).grid ** 2 + 1
        else:
            with torch.device("meta"):
                row["params_m"] = sum(p.numel() for p in build(name).parameters()) / 1e6
        for mode, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
            cmd = [sys.executable, __file__, "--worker", name, mode, str(batch), "--steps", str(args.steps),
                   "--device", args.device]  # fmt: skip
            env = {**os.environ, BACKEND_ENV: backend} if backend != "-" else None
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                print(f"{name} {backend} {mode} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row[f"{mode}_batch"], row[f"{mode}_images_per_s"] = result["batch"], result["images_per_s"]
        print(f"  {name:15s} {backend:10s} infer {row.get('infer_images_per_s') or 0:8.2f} img/s  "
              f"train {row.get('train_images_per_s') or 0:8.2f} img/s", flush=True)  # fmt: skip
        rows.append(row)
    device = torch.device(args.device)
    print(f"\nthroughput at 224 px on {environment(device)['device']}" + (" (bf16 autocast)" if on_gpu else " (fp32)"))
    print_table(rows, [("model", "model", "s"), ("backend", "scan backend", "s"), ("params_m", "params (M)", ".1f"),
                       ("infer_batch", "batch", "d"), ("infer_images_per_s", "inference img/s", ".2f"),
                       ("train_batch", "batch", "d"), ("train_images_per_s", "training img/s", ".2f")])  # fmt: skip
    config = {"steps": args.steps, "infer_batch": args.infer_batch, "train_batch": args.train_batch,
              "precision": "bf16 autocast" if on_gpu else "fp32"}  # fmt: skip
    write_json(args.out, {"benchmark": "throughput_224px", **environment(device), "config": config, "rows": rows})


if __name__ == "__main__":
    main()
