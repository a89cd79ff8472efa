"""ARM's checkpoint format (OliverRensu/ARM): an explicit key map into this library's names.

ARM saves ``{'model', 'model_ema', 'optimizer', 'args': argparse.Namespace, ...}`` with torch.save.
Its classifier keeps the class token in the middle of the sequence with a position-embedding slot of
its own; that slot is folded into our class token (the two are only ever added together).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from starmamba.errors import load_error_reason
from starmamba.models.backbone import ClassifierConfig

_DIRECTIONS = {None: 0, "_b": 1, "_c": 2, "_c_b": 3}  # row fwd, row bwd, column fwd, column bwd
_MIXER = r"layers\.(\d+)\.mixer\."

# (ARM key pattern, our key), every ARM weight of the trunk and the classifier.
_KEY_MAP: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"patch_embed\.proj\.(weight|bias)"), lambda m: f"encoder.patch_embed.proj.{m[1]}"),
    (re.compile(r"pos_embed"), lambda m: "encoder.pos_embed"),
    (re.compile(r"cls_token"), lambda m: "cls_token"),
    (re.compile(r"layers\.(\d+)\.norm([12])\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.norm{m[2]}.{m[3]}"),
    (re.compile(r"layers\.(\d+)\.mlp\.(w[123])\.(weight|bias)"), lambda m: f"encoder.blocks.{m[1]}.mlp.{m[2]}.{m[3]}"),
    (re.compile(_MIXER + r"(in_proj|out_proj)\.weight"), lambda m: f"encoder.blocks.{m[1]}.mixer.{m[2]}.weight"),
    (
        re.compile(_MIXER + r"(conv1d|x_proj|dt_proj)(_b|_c|_c_b)?\.(weight|bias)"),
        lambda m: f"encoder.blocks.{m[1]}.mixer.directions.{_DIRECTIONS[m[3]]}.{m[2]}.{m[4]}",
    ),
    (
        re.compile(_MIXER + r"A(_b|_c|_c_b)?_log"),
        lambda m: f"encoder.blocks.{m[1]}.mixer.directions.{_DIRECTIONS[m[2]]}.A_log",
    ),
    (re.compile(_MIXER + r"D(_b|_c|_c_b)?"), lambda m: f"encoder.blocks.{m[1]}.mixer.directions.{_DIRECTIONS[m[2]]}.D"),
    (re.compile(r"norm_f\.(weight|bias)"), lambda m: f"norm.{m[1]}"),
    (re.compile(r"head\.(weight|bias)"), lambda m: f"head.{m[1]}"),
]
# ARM's pretraining decoder: not part of any encoder or classifier.
_DECODER = re.compile(r"(dec_block|enc2dec|norm_[1-4]|ar_norm|ar_pred)\..+|ar_token|dec_pos_embed|mask")


def read_arm_checkpoint(path: str | Path) -> dict:
    """Load an ARM ``.pth`` safely: tensors and plain values only, plus its pickled argparse.Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load fails on a file it cannot read in many types
        raise ValueError(f"{path} is not a PyTorch checkpoint that loads safely ({load_error_reason(err)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path} is not an ARM checkpoint: expected a dict with a 'model' state dict")
    return checkpoint


def from_arm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """ARM state dict -> ours. Decoder weights are dropped; any other unknown key is an error."""
    ours, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if _DECODER.fullmatch(key):
            continue
        for pattern, rename in _KEY_MAP:
            match = pattern.fullmatch(key)
            if match:
                ours[rename(match)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in ARM's format: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    pos = ours.get("encoder.pos_embed")
    if pos is not None and "cls_token" in ours and math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
        slot = (pos.shape[1] - 1) // 2  # ARM's middle class token sits at patches // 2
        ours["cls_token"] = ours["cls_token"] + pos[:, slot : slot + 1]
        ours["encoder.pos_embed"] = torch.cat([pos[:, :slot], pos[:, slot + 1 :]], dim=1)
    return ours


def arm_classifier_config(state: dict[str, Tensor], args: argparse.Namespace | None) -> ClassifierConfig:
    """The ClassifierConfig of an ARM classifier, read off its (mapped) weights and saved args."""
    proj = state["encoder.patch_embed.proj.weight"]
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks.")}
    grid = math.isqrt(state["encoder.pos_embed"].shape[1])
    scans = 4 if any(".directions.1." in k for k in state) else 1
    return ClassifierConfig(
        img_size=grid * proj.shape[-1],
        patch_size=proj.shape[-1],
        in_chans=proj.shape[1],
        dim=proj.shape[0],
        depth=len(blocks),
        scans=scans,
        num_classes=state["head.weight"].shape[0],
        cls_token="middle",
        global_pool=bool(getattr(args, "global_pool", True)),  # ARM's README finetunes with --global_pool True
    )
