"""Wrong model factories for the custom_*.yaml cases (copied into the directory the cases run from)."""

import torch


def returns_a_dict(shape, num_classes):
    return {"layer": torch.nn.Linear(3, num_classes)}


def wrong_classes(shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes + 1))


def wrong_input(shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(10, num_classes))


def needs_depth(shape, num_classes, depth):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))


NOT_CALLABLE = 3
