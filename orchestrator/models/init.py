"""Weight initialisation (Xavier/Glorot, He/Kaiming, orthogonal) for conv and linear layers.

Gains follow the activation, as in torch.nn.init.calculate_gain; biases start
at zero. Norm layers keep weight 1 / bias 0.
"""

from torch import nn

_GAIN_NAME = {"relu": "relu", "leaky_relu": "leaky_relu", "elu": "relu", "silu": "relu", "swish": "relu", "gelu": "relu"}


def init_weights(model: nn.Module, scheme: str, activation: str = "relu", leaky_slope: float = 0.01) -> nn.Module:
    """Initialise every Conv/Linear weight of `model` in place with `scheme`; returns the model."""
    if scheme == "default":
        return model
    nonlinearity = _GAIN_NAME.get(activation, "relu")
    param = leaky_slope if nonlinearity == "leaky_relu" else None
    gain = nn.init.calculate_gain(nonlinearity, param)
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        weight = module.weight
        if scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight, gain=gain)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(weight, gain=gain)
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, a=param or 0.0, nonlinearity=nonlinearity)
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight, a=param or 0.0, nonlinearity=nonlinearity)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(weight, gain=gain)
        else:
            raise ValueError(f"unknown init {scheme!r}")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model
