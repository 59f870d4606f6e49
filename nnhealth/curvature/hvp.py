"""Hessian-vector products of the scan's loss w.r.t. the trainable parameters.

The loss and its gradient graph are built once (``create_graph=True``) and every product
is one more backward through that graph (``retain_graph=True``): measured on CPU that is
the cheapest correct way (1.35-2.6x a forward+backward per product, against 2.4-3.5x for
a fresh double backward and 2.7-5.8x for torch.func forward-over-reverse). The graph
also fixes the operator: the batch, and the mode BatchNorm ran in, are those of that one
forward. Dropout is switched off for it (a product must not resample masks); the model's
modes, buffers and RNG are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Self

import torch
from torch import nn

from nnhealth.capture.instrument import call_model
from nnhealth.capture.state import preserved_state
from nnhealth.errors import CaptureError

_NO_DOUBLE_BACKWARD = ("not implemented", "does not support double backward", "derivative for")


@contextlib.contextmanager
def _math_attention(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class NoCurvature(CaptureError):
    """There is no Hessian to measure here (nothing trainable, or the loss is linear)."""


class HessianOperator:
    """``matvec(v)`` = H v for the flat float64 vector ``v`` over the trainable params.

    Use as a context manager: the model is set up (mode, dropout off) on entry and
    restored on exit, where the retained graph is freed.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        make_loss: Callable[[Any], torch.Tensor],
        *,
        mode: str = "train",
        seed: int = 0,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.make_loss = make_loss
        self.mode = mode
        self.seed = seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n = sum(p.numel() for p in self.params)
        self.products = 0
        self.backend = "default"
        self.notes: list[str] = []
        self._grads: tuple[torch.Tensor, ...] | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Self:
        if not self.params:
            raise NoCurvature("the model has no trainable parameters: there is no Hessian")
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(preserved_state(self.model, self.mode))
            self._stack.enter_context(torch.random.fork_rng(devices=[]))
            torch.default_generator.manual_seed(self.seed)
            # dropout modules, and attention's own dropout (MultiheadAttention applies it
            # functionally when training); functional dropout in a custom forward follows
            # its module's mode and cannot be switched off from here
            dropouts = [
                m
                for m in self.model.modules()
                if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))
            ]
            for m in dropouts:
                m.training = False  # restored by preserved_state
            if dropouts and self.mode == "train":
                self.notes.append(
                    f"dropout off while taking Hessian products ({len(dropouts)} modules)"
                )
            try:
                self._build(math_attention=False)
            except Exception as exc:  # the user's model, with create_graph
                raise CaptureError(
                    f"the forward for Hessian products failed: {str(exc).splitlines()[0]}"
                ) from exc
        except BaseException:
            self._stack.close()
            raise
        return self

    def _build(self, math_attention: bool) -> None:
        with torch.enable_grad(), _math_attention(math_attention):
            loss = self.make_loss(call_model(self.model, self.inputs))
            self.loss = float(loss.detach())
            if not loss.requires_grad:
                raise NoCurvature("the loss does not depend on any trainable parameter")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            # parameters the loss does not use, or uses only linearly, have zero Hessian
            # rows: leave them out of the operator (and say how many)
            kept = [
                (p, g)
                for p, g in zip(self.params, grads, strict=True)
                if g is not None and g.requires_grad
            ]
            if not kept:
                raise NoCurvature("the loss is linear in every trainable parameter: H = 0")
            dropped = len(self.params) - len(kept)
            if dropped:
                self.notes.append(
                    f"{dropped} parameter tensor(s) have no second derivative here (unused "
                    "by the loss, or linear in it) and are left out of the Hessian"
                )
            self.params = [p for p, _ in kept]
            self.n = sum(p.numel() for p in self.params)
            self._grads = tuple(g for _, g in kept)

    def _fall_back_to_math_attention(self, exc: RuntimeError) -> None:
        """A kernel without a second derivative (fused scaled-dot-product attention on
        CPU): rebuild the graph under the math attention backend, once."""
        if self.backend != "default" or not any(s in str(exc) for s in _NO_DOUBLE_BACKWARD):
            raise CaptureError(f"cannot take Hessian products: {str(exc).splitlines()[0]}") from exc
        self._build(math_attention=True)
        self.backend = "math attention"
        self.notes.append(
            "a kernel here has no second derivative (fused scaled-dot-product attention on "
            "CPU): Hessian products used the math attention backend"
        )

    def __exit__(self, *exc: object) -> None:
        self._grads = None
        if self._stack is not None:
            self._stack.close()

    def gradient(self) -> torch.Tensor:
        """The loss gradient over the operator's parameters, flat float64 (a start
        vector for Lanczos: no product needed, the graph already holds it)."""
        if self._grads is None:
            raise RuntimeError("HessianOperator.gradient outside its context")
        return torch.cat([g.detach().reshape(-1).to(torch.float64) for g in self._grads])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v, computed in the parameters' dtype, returned as float64."""
        if self._grads is None:
            raise RuntimeError("HessianOperator.matvec outside its context")
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        try:
            hv = torch.autograd.grad(
                self._grads,
                self.params,
                grad_outputs=pieces,
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError as exc:  # found on the first product, not by a wasted probe
            self._fall_back_to_math_attention(exc)
            return self.matvec(v)
        self.products += 1
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                for h, p in zip(hv, self.params, strict=True)
            ]
        )
