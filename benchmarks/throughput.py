"""Throughput of the MambaMLP presets (paper Table 7) side by side with a ViT of the same size.

For each ``mambamlp_*`` preset at 224 px and each precision (fp32, and bf16 autocast): inference
images/s (in ``torch.inference_mode``) and training images/s (forward + backward + AdamW step) of
MambaMLP on the default scan backend (or ``--backend``) and of a ViT of the same width and depth
built from PyTorch's own ``nn.TransformerEncoderLayer`` (its inference fast path on), and their
ratio. Each measurement runs in a fresh process; the two models take turns for ``--rounds`` rounds
and each keeps its best, so that a noisy spell of the machine favours neither. A batch that does
not fit in memory is halved until it does.

    python benchmarks/throughput.py                                   # every size, both precisions
    python benchmarks/throughput.py --models mambamlp_tiny --precisions fp32 --modes infer
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
from starmamba.ops import BACKEND_ENV, resolve_backend
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


def measure(name: str, mode: str, batch: int, steps: int, precision: str, device: torch.device) -> float:
    """Images per second of ``steps`` timed iterations after one warm-up."""
    model = build(name).to(device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    amp = autocast(device, precision)
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
            with torch.inference_mode(), amp:
                model(images)

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - start)


def worker(name: str, mode: str, batch: int, precision: str, args) -> dict:
    device = torch.device(args.device)
    while True:
        try:
            speed = measure(name, mode, batch, args.steps, precision, device)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                return {"batch": 0, "images_per_s": None}
            batch //= 2
            torch.cuda.empty_cache()
    return {"batch": batch, "images_per_s": speed}


def run_worker(name: str, mode: str, batch: int, precision: str, backend: str, args) -> dict | None:
    """One measurement in a fresh process; None (and a line saying why) if it failed."""
    cmd = [sys.executable, __file__, "--worker", name, mode, str(batch), precision, "--steps", str(args.steps),
           "--device", args.device]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, BACKEND_ENV: backend})
    if done.returncode != 0:
        print(f"{name} {mode} {precision} failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=[m for m in list_models() if m.startswith("mambamlp")])
    parser.add_argument("--backend", default=None, help="MambaMLP's scan backend (default: the device's default)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=["infer", "train"], default=["infer", "train"])
    parser.add_argument("--infer_batch", type=int, default=256 if on_gpu else 8)
    parser.add_argument("--train_batch", type=int, default=128 if on_gpu else 4)
    parser.add_argument("--steps", type=int, default=10 if on_gpu else 2)
    parser.add_argument("--rounds", type=int, default=2, help="turns each model takes per measurement")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "MODE", "BATCH", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.worker[3], args)))
        return

    device = torch.device(args.device)
    backend = resolve_backend(args.backend, device)
    rows = []
    for mamba in args.models:
        vit = f"vit_{mamba.split('_', 1)[1]}"
        with torch.device("meta"):
            params = {name: sum(p.numel() for p in build(name).parameters()) / 1e6 for name in (mamba, vit)}
        for precision in args.precisions:
            for mode in args.modes:
                batch = args.infer_batch if mode == "infer" else args.train_batch
                best: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for name in (mamba, vit):
                        result = run_worker(name, mode, batch, precision, backend, args)
                        if (
                            result
                            and result["images_per_s"]
                            and (name not in best or result["images_per_s"] > best[name]["images_per_s"])
                        ):
                            best[name] = result
                if len(best) < 2:
                    continue
                row = {"size": mamba.split("_", 1)[1], "precision": precision, "mode": mode,
                       "batch": best[mamba]["batch"], "tokens": model_config(mamba).grid ** 2 + 1,
                       "mambamlp_params_m": params[mamba], "vit_params_m": params[vit],
                       "mambamlp_images_per_s": best[mamba]["images_per_s"],
                       "vit_images_per_s": best[vit]["images_per_s"]}  # fmt: skip
                row["ratio"] = row["mambamlp_images_per_s"] / row["vit_images_per_s"]
                print(f"  {row['size']:6s} {precision} {mode:5s} MambaMLP {row['mambamlp_images_per_s']:7.2f} img/s  "
                      f"ViT {row['vit_images_per_s']:7.2f} img/s  x{row['ratio']:.2f}", flush=True)  # fmt: skip
                rows.append(row)
    env = environment(device)
    print(f"\nthroughput at 224 px on {env['device']}, MambaMLP on the {backend} scan backend")
    print_table(rows, [("size", "size", "s"), ("precision", "precision", "s"), ("mode", "mode", "s"),
                       ("batch", "batch", "d"), ("mambamlp_params_m", "MambaMLP params (M)", ".1f"),
                       ("vit_params_m", "ViT params (M)", ".1f"), ("mambamlp_images_per_s", "MambaMLP img/s", ".2f"),
                       ("vit_images_per_s", "ViT img/s", ".2f"), ("ratio", "MambaMLP / ViT", ".2f")])  # fmt: skip
    config = {"steps": args.steps, "rounds": args.rounds, "infer_batch": args.infer_batch,
              "train_batch": args.train_batch, "scan_backend": backend, "inference": "torch.inference_mode",
              "bf16": "torch.autocast bfloat16"}  # fmt: skip
    write_json(args.out, {"benchmark": "throughput_224px", **env, "config": config, "rows": rows})


if __name__ == "__main__":
    main()
