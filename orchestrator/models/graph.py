"""Graph convolution in plain torch (no graph library needed for dense small graphs).

A sample is one graph of N nodes stored as an [N, N + F] matrix: the adjacency (N columns) followed by
the node features (F columns). Batches of graphs are dense tensors, so data parallelism is over graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.models.activations import make_activation


def normalized_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """Kipf & Welling's D^-1/2 (A + I) D^-1/2, batched over the leading dimension."""
    a = adjacency + torch.eye(adjacency.shape[-1], device=adjacency.device, dtype=adjacency.dtype)
    d = a.sum(-1).clamp_min(1e-12).rsqrt()
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


class GCNLayer(nn.Module):
    """H' = act(Â H W + H W_self): the self term keeps a node's own signal apart from its neighbours'."""

    def __init__(self, cin: int, cout: int, activation: str, leaky_slope: float):
        super().__init__()
        self.neighbours = nn.Linear(cin, cout)
        self.own = nn.Linear(cin, cout, bias=False)
        self.act = make_activation(activation, leaky_slope)

    def forward(self, h: torch.Tensor, a_hat: torch.Tensor) -> torch.Tensor:
        return self.act(a_hat @ self.neighbours(h) + self.own(h))


class GCN(nn.Module):
    """Graph classification: GCN layers, mean+max readout over nodes, a linear head."""

    def __init__(self, nodes: int, node_features: int, hidden: list[int], num_classes: int, *,
                 activation: str, leaky_slope: float, dropout: float):
        super().__init__()
        self.nodes = nodes
        widths = [node_features, *hidden]
        self.layers = nn.ModuleList(GCNLayer(a, b, activation, leaky_slope) for a, b in zip(widths, widths[1:]))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, N, N + F)
        a_hat, h = normalized_adjacency(x[..., :self.nodes]), x[..., self.nodes:]
        for layer in self.layers:
            h = self.dropout(layer(h, a_hat))
        return self.head(torch.cat([h.mean(1), h.amax(1)], dim=-1))
