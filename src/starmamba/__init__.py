"""starmamba: STAR autoregressive pretraining of Vision Mamba (MambaMLP), finetuning and evaluation."""

__version__ = "0.1.0"
