"""Activation memory of a training step: bytes saved for the backward pass, with and without
``--grad_checkpointing``, for every preset at its paper batch per GPU. No GPU needed.

The models are built on the meta device, so that a forward pass at full scale only computes shapes, and
every tensor saved for the backward pass is counted once (distinct storages, parameters left out).
The counts follow a CUDA training step in three respects: the scan is the fused Triton kernel's (its
launches are skipped on meta tensors; what it keeps is counted: time-major inputs and the fp32 state
entering every chunk); the decoder's masked attention is the memory-efficient kernel a GPU runs (it
keeps the log-sum-exp, not the attention weights that the math kernel on the meta device would);
activations are bf16, as under the bf16 autocast training runs with. The model is cast to bf16 for
that, so autocast's fp32 islands (its norms' outputs, the loss) count as bf16: the counts are a few
percent low.

Paper batches per GPU (8 GPUs): STAR pretraining 2048 images = 256 per GPU, 32 sequences of 8 images;
finetuning 1024 images = 128 per GPU. (The Large run presets reach them in 2 or 4 accumulated
micro-batches of 128 or 32 images, which divides the saved bytes likewise.) A checkpointed backward
holds one block's activations on top of the checkpointed ones while it recomputes that block.

    python benchmarks/memory.py            # every preset -> benchmarks/results/memory.json
    python benchmarks/memory.py --models star_base mambamlp_large
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, print_table, write_json
from starmamba.models import create_model, list_models
from starmamba.ops import BACKEND_ENV

GIB = 2**30
PAPER_BATCH = {"star": 256, "mambamlp": 128}  # images per GPU


class _NoLaunch:
    """Stands in for a Triton kernel on meta tensors: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def efficient_attention(q, k, v, attn_mask=None):
    """``F.scaled_dot_product_attention`` with a boolean mask, as the memory-efficient kernel computes it."""
    bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    bias = bias.expand(q.shape[0], q.shape[1], -1, -1)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[0]


@contextlib.contextmanager
def gpu_kernels_on_meta():
    """Run the Triton scan (its kernels not launched: shapes and saved tensors only) and the memory-efficient
    attention on meta tensors."""
    from starmamba.ops import scan_triton

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", efficient_attention))
        stack.enter_context(mock.patch.dict(os.environ, {BACKEND_ENV: "triton"}))
        stack.enter_context(mock.patch.object(scan_triton, "triton_status", lambda device: (True, "")))
        for kernel in ("_scan_fwd_kernel", "_scan_bwd_kernel"):
            stack.enter_context(mock.patch.object(scan_triton, kernel, _NoLaunch()))
        yield


def saved_for_backward(run) -> int:
    """Bytes of the distinct storages ``run()`` keeps for its backward pass, parameters left out."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter):
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def measure(name: str, batch: int) -> dict:
    """Saved-for-backward GiB of preset ``name`` at ``batch`` images, without and with checkpointing; and of
    one encoder block, which the checkpointed backward recomputes (and holds) one at a time."""
    with torch.device("meta"):
        model = create_model(name).to(torch.bfloat16).train()
    size = model.cfg.img_size
    images = torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "batch": batch, "img_size": size, "params_m": params / 1e6}
    if name.startswith("star"):
        row |= {"sequences": batch // model.cfg.images_per_sequence, "tokens": model.layout.num_tokens}
    else:
        row |= {"sequences": batch, "tokens": model.cfg.grid**2 + (model.cls_index is not None)}
    with gpu_kernels_on_meta():
        for enable, key in ((False, "saved_gib"), (True, "saved_checkpointed_gib")):
            model.set_grad_checkpointing(enable)
            row[key] = saved_for_backward(lambda: model(images)) / GIB
        tokens = torch.empty(row["sequences"], row["tokens"], model.cfg.dim, device="meta", dtype=torch.bfloat16)
        block, orders = model.encoder.blocks[0], getattr(model, "scan_orders", None)
        row["one_block_gib"] = saved_for_backward(lambda: block(tokens.requires_grad_(), orders)) / GIB
    row["weights_and_optimizer_gib"] = params * 16 / GIB  # fp32 weights, gradients and AdamW's two moments
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args()
    rows = [measure(name, PAPER_BATCH[name.split("_")[0]]) for name in args.models]
    print_table(
        rows,
        [("model", "model", ""), ("batch", "images/GPU", "d"), ("sequences", "sequences", "d"),
         ("tokens", "tokens", "d"), ("saved_gib", "saved GiB", ".1f"),
         ("saved_checkpointed_gib", "checkpointed GiB", ".1f"), ("one_block_gib", "+ 1 block GiB", ".2f"),
         ("weights_and_optimizer_gib", "weights+AdamW GiB", ".1f")],
    )  # fmt: skip
    write_json(args.out, {"environment": environment(torch.device("cpu")), "rows": rows, "notes": __doc__.strip()})


if __name__ == "__main__":
    main()
