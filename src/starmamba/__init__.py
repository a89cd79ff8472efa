"""starmamba: STAR autoregressive pretraining of Vision Mamba (MambaMLP), finetuning and evaluation."""

from starmamba.models import create_model, list_models
from starmamba.ops import selective_scan

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "selective_scan"]
