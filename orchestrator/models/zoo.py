"""MLP, plain CNN and ResNet for small images and tabular rows (LSTM: sequence.py, GCN: graph.py)."""

from __future__ import annotations

import math

from torch import nn

from orchestrator.models.activations import make_activation


def _norm2d(channels: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if enabled else nn.Identity()


class MLP(nn.Sequential):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, *, batch_norm: bool,
                 activation: str, leaky_slope: float, dropout: float):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h) if batch_norm else nn.Identity(),
                       make_activation(activation, leaky_slope), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN(nn.Sequential):
    """conv-norm-act per stage; stages after the first downsample by 2."""

    def __init__(self, in_channels: int, channels: list[int], num_classes: int, *, batch_norm: bool,
                 activation: str, leaky_slope: float, dropout: float):
        layers: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(width, c, 3, stride=1 if i == 0 else 2, padding=1, bias=not batch_norm),
                       _norm2d(c, batch_norm), make_activation(activation, leaky_slope)]
            width = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes)]
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """He et al.'s two-conv residual block; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, batch_norm: bool, activation: str, leaky_slope: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm2d(cout, batch_norm)
        self.act1 = make_activation(activation, leaky_slope)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm2d(cout, batch_norm)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not batch_norm), _norm2d(cout, batch_norm))
        self.act2 = make_activation(activation, leaky_slope)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, channels: list[int], blocks_per_stage: int, num_classes: int, *,
                 batch_norm: bool, activation: str, leaky_slope: float, dropout: float, zero_init_residual: bool):
        super().__init__()
        kw = dict(batch_norm=batch_norm, activation=activation, leaky_slope=leaky_slope)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=not batch_norm),
                                  _norm2d(channels[0], batch_norm), make_activation(activation, leaky_slope))
        blocks, width = [], channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(width, c, 2 if (i > 0 and j == 0) else 1, **kw))
                width = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, num_classes))
        self.zero_init_residual = zero_init_residual and batch_norm

    def reset_residual_branches(self) -> None:
        """Goyal et al.: zero the last BN gamma of each block so the net starts near identity."""
        if self.zero_init_residual:
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build_network(kind: str, shape: list[int], num_classes: int, **options) -> nn.Module:
    common = {k: options[k] for k in ("batch_norm", "activation", "leaky_slope", "dropout")}
    if kind == "mlp":
        return MLP(math.prod(shape), options["hidden"], num_classes, **common)
    if kind == "cnn":
        return CNN(shape[0], options["channels"], num_classes, **common)
    if kind == "lstm":
        from orchestrator.models.sequence import LSTMClassifier
        if len(shape) != 2:
            raise ValueError("lstm needs data.shape [time, features]")
        return LSTMClassifier(shape[1], options["hidden"], num_classes, dropout=options["dropout"])
    if kind == "gcn":
        from orchestrator.models.graph import GCN
        if len(shape) != 2 or shape[1] <= shape[0]:
            raise ValueError("gcn needs data.shape [nodes, nodes + node_features]")
        return GCN(shape[0], shape[1] - shape[0], options["hidden"], num_classes, activation=options["activation"],
                   leaky_slope=options["leaky_slope"], dropout=options["dropout"])
    if kind == "transformer":
        from orchestrator.models.transformer import TransformerClassifier
        if len(shape) != 2:
            raise ValueError("transformer needs data.shape [time, features]")
        return TransformerClassifier(shape[0], shape[1], num_classes, width=options["width"], layers=options["layers"],
                                     heads=options["heads"], dropout=options["dropout"], qk_norm=options["qk_norm"])
    if kind == "resnet":
        return ResNet(shape[0], options["channels"], options["blocks_per_stage"], num_classes,
                      zero_init_residual=options["zero_init_residual"], **common)
    raise ValueError(f"unknown model kind {kind!r}")
