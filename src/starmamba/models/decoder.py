"""ARM's lightweight decoder: cross-attention layers from pixel queries into multi-level encoder features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CrossAttentionBlock(nn.Module):
    """q + attn(LN(q), LN(kv)) then q + MLP(LN(q)); queries (B, Q, dim), memory (B, K, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend(self, q: Tensor, kv: Tensor, mask: Tensor) -> Tensor:
        batch, queries, dim = q.shape
        q = self.q(q).view(batch, queries, self.heads, -1).transpose(1, 2)
        k, v = self.kv(kv).view(batch, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, queries, dim))

    def forward(self, q: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """``mask`` (Q, K) bool: True where a query may attend."""
        q = q + self.attend(self.norm_q(q), self.norm_kv(memory), mask)
        return q + self.mlp(self.norm_mlp(q))


class Decoder(nn.Module):
    """A stack of cross-attention blocks; block k reads memory k. Xavier-uniform weights, zero biases."""

    def __init__(self, dim: int, depth: int, head_dim: int = 64, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, dim // head_dim, mlp_ratio) for _ in range(depth))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, queries: Tensor, memories: list[Tensor], mask: Tensor) -> Tensor:
        for block, memory in zip(self.blocks, memories, strict=True):
            queries = block(queries, memory, mask)
        return queries
