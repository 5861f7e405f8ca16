"""The user's own network: `model.kind: custom` with `model.factory: "package.module:function"`.

The factory is called as `function(shape=(...), num_classes=N, **model.args)` and must return an
`nn.Module` mapping a batch of `data.shape` samples to `num_classes` logits. It is imported with the
current directory first on `sys.path`, as `python -m` would; Ray puts the driver's current directory
on its workers' paths, and `keel submit` uploads it as the job's working directory, so the same
import works on every rank and on a cluster.

Every way the factory can be wrong (a malformed path, an import error, a missing or non-callable
attribute, a call that raises, something that is not a module, a forward pass that fails or returns
the wrong shape) is one BadInput naming `model.factory`, raised by `check_custom_model` in preflight
before Ray starts.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

import torch
from torch import nn

from orchestrator.errors import BadInput

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_factory(path: str) -> Callable[..., nn.Module]:
    if not FACTORY_PATTERN.match(path or ""):
        raise BadInput(f"model.factory: expected 'package.module:function', got {path!r}")
    module_name, attr = path.split(":")
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)  # as `python -m` does; Ray gives workers the driver's current directory too
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or any error the module raises at import
        raise BadInput(f"model.factory: cannot import {module_name!r} (from {here}): {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise BadInput(f"model.factory: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise BadInput(f"model.factory: {module_name}.{attr} is not a function ({type(factory).__name__})")
    return factory


def build_custom(path: str, shape: list[int], num_classes: int, args: dict[str, Any]) -> nn.Module:
    factory = load_factory(path)
    try:
        net = factory(shape=tuple(shape), num_classes=num_classes, **args)
    except Exception as exc:
        raise BadInput(f"model.factory: {path}(shape={tuple(shape)}, num_classes={num_classes}, **model.args) "
                       f"raised {type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise BadInput(f"model.factory: {path} returned a {type(net).__name__}, not a torch.nn.Module")
    if not any(True for _ in net.parameters()):
        raise BadInput(f"model.factory: {path} returned a module with no parameters; there is nothing to train")
    return net


def check_custom_model(net: nn.Module, path: str, shape: list[int], num_classes: int) -> None:
    """A forward pass on two zero samples: the model takes `data.shape` and gives `num_classes` logits."""
    batch = torch.zeros(2, *shape)
    was_training = net.training
    net.eval()  # batch norm in train mode refuses tiny batches; eval needs no statistics
    try:
        with torch.no_grad():
            out = net(batch)
    except Exception as exc:
        raise BadInput(f"model.factory: {path}'s forward failed on a batch of shape {tuple(batch.shape)} (data.shape): "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"model.factory: {path} returned {got} for a batch of shape {tuple(batch.shape)}; "
                       f"expected logits of shape (2, {num_classes}) (data.num_classes)")


def parameters_without_gradient(net: nn.Module, shape: list[int], frozen: tuple[str, ...] = ()) -> list[str]:
    """Names of the trainable parameters that a training-mode forward and backward on two zero samples leaves
    without a gradient (an auxiliary head never called, a layer built and left out of forward). DDP refuses
    them at the second step unless it searches for them every step. Seeded, so every rank finds the same; the
    model is left as it was (its buffers put back, no gradients: no copy of a large model is made);
    `frozen`: init_from.freeze's prefixes, whose parameters are not trained anyway."""
    buffers = [(b, b.detach().clone()) for b in net.buffers()]  # BN statistics and the like move in train mode
    was_training = net.training
    net.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net(torch.zeros(2, *shape)).float().sum().backward()
        return [name for name, p in net.named_parameters()
                if p.requires_grad and p.grad is None and not name.startswith(frozen)]
    except Exception:  # a model that cannot train on two zero samples: no verdict (DDP's own error stands)
        return []
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for p in net.parameters():
            p.grad = None
        net.train(was_training)
