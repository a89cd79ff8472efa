"""starmamba: STAR autoregressive pretraining of Vision Mamba (MambaMLP), finetuning and evaluation."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

# The CPU scan (numba) runs its own threads beside torch's OpenMP workers, which by default spin
# for a while after every parallel op and so take the cores those threads need: on 2 cores the
# scan's forward ran 1.7x slower right after a torch op, the small finetune step 18% slower.
# Sleeping workers cost torch's own ops a few percent. OpenMP reads this once, when torch loads,
# so it only takes effect if starmamba is imported first (the starmamba command is).
if (
    "torch" not in _sys.modules
    and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & _os.environ.keys()
    and _importlib_util.find_spec("numba") is not None
):
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from starmamba.models import create_model, list_models
from starmamba.ops import selective_scan

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "selective_scan"]
