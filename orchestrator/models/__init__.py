"""Model zoo: `build_model(spec)` gives an initialised network for the job (the zoo's or the user's own)."""

from torch import nn

from orchestrator.models.activations import make_activation
from orchestrator.models.init import init_weights
from orchestrator.models.zoo import CNN, MLP, ResNet, build_network

__all__ = ["build_model", "unwrap", "make_activation", "init_weights", "MLP", "CNN", "ResNet"]


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP (or any `.module`) wrapper."""
    return model.module if hasattr(model, "module") else model


def build_model(model_spec, data_spec) -> nn.Module:
    """The network named by a ModelSpec, sized for a DataSpec, with its init applied.

    A custom model keeps its own init under `init: auto` (the user chose it); a named scheme is applied."""
    if model_spec.kind == "custom":
        from orchestrator.models.custom import build_custom

        net = build_custom(model_spec.factory, data_spec.shape, data_spec.num_classes, model_spec.args)
        if model_spec.init != "auto":
            init_weights(net, model_spec.init, model_spec.activation, model_spec.leaky_slope)
        return net
    options = model_spec.model_dump(exclude={"kind", "init", "factory", "args"})
    net = build_network(model_spec.kind, data_spec.shape, data_spec.num_classes, **options)
    init_weights(net, model_spec.init, model_spec.activation, model_spec.leaky_slope)
    if isinstance(net, ResNet):
        net.reset_residual_branches()
    return net
