"""Hidden-layer activations by name (the classic non-saturating ones)."""

from torch import nn


def make_activation(name: str, leaky_slope: float = 0.01) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(leaky_slope)
    if name == "elu":
        return nn.ELU()
    if name in ("silu", "swish"):  # swish with beta=1 is SiLU
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}")
