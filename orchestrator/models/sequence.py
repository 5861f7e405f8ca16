"""A stacked LSTM classifier for sequences of shape [time, features]."""

from __future__ import annotations

import torch
from torch import nn


class LSTMClassifier(nn.Module):
    """One nn.LSTM per entry of `hidden` (widths may differ), dropout between layers, a linear head on the
    top layer's last output. Exploding gradients through long sequences are what clipping is for."""

    def __init__(self, input_size: int, hidden: list[int], num_classes: int, *, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList()
        width = input_size
        for h in hidden:
            self.layers.append(nn.LSTM(width, h, batch_first=True))
            width = h
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, time, features)
        for i, lstm in enumerate(self.layers):
            x, _ = lstm(x)
            if i < len(self.layers) - 1:
                x = self.dropout(x)
        return self.head(self.dropout(x[:, -1]))
