"""A user's own model, trained by Keel: any torch.nn.Module works.

Keel imports `build` from the current directory (run `keel` from the repository root) and calls it as
`build(shape=data.shape, num_classes=data.num_classes, **model.args)`. Nothing Keel-specific is needed
here: Keel converts the batch norms to synchronized ones, wraps the model in DDP, and applies its
clipping, guards, checkpoints and reports to it as to its own models.
"""

from torch import nn


class TinyConvNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build(shape, num_classes, width=32, dropout=0.1):
    return TinyConvNet(shape[0], num_classes, width, dropout)
