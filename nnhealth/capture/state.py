"""Leave the model as it was found: each module's mode and every buffer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module, mode: str) -> Iterator[None]:
    """Set train/eval for the pass; afterwards restore every module's mode and buffers.

    A train-mode forward updates BatchNorm running statistics in place: those buffers
    are copied before and written back after, into the same tensor objects.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = []
    for module in model.modules():
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None:
                buffers.append((module, bname, buf, buf.detach().clone()))
    try:
        model.train(mode == "train")
        yield
    finally:
        with torch.no_grad():
            for module, bname, original, saved in buffers:
                original.copy_(saved)
                if getattr(module, bname, None) is not original:
                    setattr(module, bname, original)
        for module, training in modes:
            module.training = training
