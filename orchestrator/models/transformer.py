"""A small pre-LN Transformer encoder for sequence classification (data.shape [time, features]).

Written out rather than nn.TransformerEncoderLayer for one reason: QK-layernorm (`model.qk_norm`,
Dehghani et al. 2023; OLMo 2), which normalises each head's queries and keys before their dot product
so attention logits cannot grow without bound (a known source of loss spikes at high learning rates).
torch's layer has no hook for it. Attention itself is torch's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, qk_norm: bool):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        head_width = width // heads
        self.q_norm = nn.LayerNorm(head_width) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_width) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, width)
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-LN: x + attention(LN(x)), then x + MLP(LN(x)); the residual stream itself is never normalised,
    which is what lets deep pre-LN stacks train without the warmup post-LN needs (Xiong et al. 2020)."""

    def __init__(self, width: int, heads: int, dropout: float, qk_norm: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attention(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerClassifier(nn.Module):
    """Linear token embedding plus a learned position embedding, `layers` pre-LN blocks, a final LayerNorm,
    mean pooling over time, a linear head.

    The position embedding starts at the token embedding's scale (the std of torch's init of `embed`,
    1/sqrt(3 features)), so that where a token is and what it is enter the first attention on equal terms.
    At GPT-2's 0.02 it was 7x weaker than the tokens for 16 features, and a task that needs a position (does
    the first token come back?) at 3x its tuned LR settled in 2 of 6 seeds on a partial solution (0.918,
    0.961); at the tokens' scale 0.994 mean, worst 0.971 (benchmarks/RESULTS.md)."""

    def __init__(self, length: int, features: int, num_classes: int, *, width: int, layers: int, heads: int,
                 dropout: float, qk_norm: bool):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.position = nn.Parameter(torch.randn(1, length, width) * (3 * features) ** -0.5)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, qk_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, features)
        h = self.embed(x) + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))
