"""Hessian-vector products in bounded memory: the graph rebuilt for every product, a
block of examples at a time.

HessianOperator keeps the whole batch's double-backward graph across products: the
cheapest products, but the graph and each product's transient gradients grow with the
batch. On ViT-B/16 at 4x3x224x224 they hold 2.0 GB and 2.3 GB more, against the 1 GB of
the three Lanczos vectors (measured, one thread). When the loss is a mean over
examples, L = sum_b (n_b / n) L_b over blocks b of the batch, so H v = sum_b (n_b / n)
H_b v: each product can build the graph of one block, differentiate it once more and
free it before the next block. Peak memory is then one block's graph whatever the batch;
each product costs one more forward+backward (ViT-B: 15.6-16.5 s per product in blocks
of 2 or 1 example against 11.6 s on the kept graph; the block size changes the time
little, the rebuild does).

The choice, by memory, before any product: the graph of one example is built and its
saved tensors counted (parameters and buffers excluded); a product peaks at about
PEAK_FACTOR times that per example (the graph, and about as much in transient
gradients: 1.75x measured on ViT-B). The whole batch's graph is kept when its peak fits
in the graph's allowance (graph_limit: one float64 parameter vector, at least
GRAPH_FLOOR, at most half the free memory), else blocks of as many examples as fit are
taken (at least one).

Blocks change nothing only when the examples do not interact. BatchNorm normalizing over
the batch (train mode, or no running statistics) couples them: the whole graph is kept
then. Anything else that couples them (a loss that is a sum, not a mean; a forward that
mixes examples) is caught by a check before any product: the blocks' weighted losses
must add up to the whole batch's (relative 1e-4), or the whole graph is kept, with a
note either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nnhealth import memory
from nnhealth._util import tensors_in
from nnhealth.capture.instrument import call_model
from nnhealth.curvature.hvp import (
    _DIFFERENTIABLE,
    HessianOperator,
    NoCurvature,
    _math_attention,
)

# a graph this small is kept whole whatever the model's size (a small model's products
# stay as fast as they can be)
GRAPH_FLOOR = 1 << 30
# a product's peak over the saved tensors of the graph it differentiates
PEAK_FACTOR = 2
MEMORY_SHARE = 0.5  # of the free memory, at most, for the graph
LOSS_RTOL = 1e-4  # the blocks' losses must add up to the batch's within this

Loss = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class Examples:
    """The batch the products are taken on, as blocks can be cut from it: ``count``
    examples; ``cut(start, stop)`` gives the model's inputs for those examples and their
    loss, weighted by their share of the batch (so the blocks' losses sum to the
    batch's)."""

    count: int
    cut: Callable[[int, int], tuple[Any, Loss]]


def graph_limit(n: int, device: torch.device) -> int:
    """Bytes the products' graph may take: one float64 vector of the ``n`` parameters,
    at least GRAPH_FLOOR, at most MEMORY_SHARE of this process's free memory."""
    allowed = max(GRAPH_FLOOR, 8 * n)
    free = memory.free_on(device)
    return allowed if free is None else min(allowed, int(MEMORY_SHARE * free))


def _gb(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2g} GB"
    return f"{nbytes / 2**20:.2g} MB"


def coupling_norms(model: nn.Module) -> list[str]:
    """The BatchNorm layers that normalize over the batch as the model is now set (train
    mode, or no running statistics): blocks of the batch would change their output."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and not isinstance(m, nn.modules.instancenorm._InstanceNorm)
        and (m.training or not m.track_running_stats)
    ]


class BlockedHessianOperator(HessianOperator):
    """HessianOperator over ``examples``: the whole batch's graph, kept, when its products
    fit in ``limit`` bytes; else each product rebuilt in ``blocks`` blocks of
    ``block_examples`` examples and summed (see the module docstring)."""

    blocks = 1  # blocks per product; 1: the whole batch's graph, built once and kept
    block_examples: int | None = None
    _gradient: torch.Tensor | None = None  # the batch's, from the check, until asked for

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        make_loss: Loss,
        examples: Examples,
        limit: int,
        *,
        mode: str = "train",
        seed: int = 0,
    ) -> None:
        super().__init__(model, inputs, make_loss, mode=mode, seed=seed)
        self.examples = examples
        self.limit = limit
        self._cut: list[tuple[Any, Loss]] = []

    def _prepare(self) -> None:
        size, note = self._block_size()
        if size >= self.examples.count:
            self._build()
            return
        count = self.examples.count
        self._cut = [self.examples.cut(s, min(s + size, count)) for s in range(0, count, size)]
        why = self._check()
        if why:
            self.notes.append(f"{note}; but {why}: the whole batch's graph was kept")
            self._cut = []
            self._build()
            return
        self.blocks, self.block_examples = len(self._cut), size
        self.notes.append(
            f"{note}: Hessian products rebuilt the graph for each product in {self.blocks} "
            f"blocks of {size} example(s) (the products are the same, the loss being a mean "
            "over examples, checked on this batch; each costs about one more forward+backward)"
        )

    def _block_size(self) -> tuple[int, str | None]:
        """Examples per block (the batch's count: the whole graph, kept), and what the
        choice rests on."""
        count = self.examples.count
        if count < 2:
            return count, None
        norms = coupling_norms(self.model)
        if norms:
            return count, None  # blocks would change what BatchNorm computes
        per_example = self._probe()
        if per_example is None:
            return count, None
        whole = PEAK_FACTOR * per_example * count
        if whole <= self.limit:
            return count, None
        size = max(1, int(self.limit // (PEAK_FACTOR * per_example)))
        note = (
            f"the whole batch's products would hold about {_gb(whole)} of graph "
            f"({_gb(per_example)} saved per example, measured on one), over the "
            f"{_gb(self.limit)} a graph may take (one float64 parameter vector, at least "
            f"{_gb(GRAPH_FLOOR)}, at most half the free memory)"
        )
        return min(size, count), note

    def _probe(self) -> int | None:
        """Bytes the graph of one example saves (parameters and buffers left out), or
        None when it cannot be measured (the whole build then reports any failure)."""
        inputs, loss = self.examples.cut(0, 1)
        # the weights, and the batch's inputs (the block's are views of them)
        held = [*self.model.parameters(), *self.model.buffers(), *tensors_in(self.inputs)]
        own = {t.untyped_storage().data_ptr() for t in held}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        try:
            with (
                torch.enable_grad(),
                _math_attention(),
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            ):
                value = loss(call_model(self.model, inputs))
                if value.requires_grad:
                    torch.autograd.grad(value, self.params, create_graph=True, allow_unused=True)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 (user code: the whole build reports it)
            return None
        return sum(saved.values())

    def _check(self) -> str | None:
        """Audit the first block's backward (as the whole build would), narrow the
        operator to the parameters with a second derivative in any block, and check that
        the blocks' losses add up to the batch's: why not, or None. Keeps the batch's
        gradient (flat float64), which this pass computes, for gradient()."""
        first, *rest = self._cut
        grads = self._audited_grads(*first)
        losses = [self.loss]
        curved = [g is not None and g.requires_grad for g in grads]
        total = _accumulate(None, grads, self.params)
        del grads
        for inputs, loss in rest:
            value, grads = self._block_grads(inputs, loss, create_graph=True)
            losses.append(value)
            curved = [
                c or (g is not None and g.requires_grad) for c, g in zip(curved, grads, strict=True)
            ]
            total = _accumulate(total, grads, self.params)
            del grads
        whole = self._whole_loss()
        summed = sum(losses)
        if abs(summed - whole) > LOSS_RTOL * max(abs(whole), sum(abs(x) for x in losses)):
            return (
                f"its blocks' losses add up to {summed:.6g}, not the batch's {whole:.6g} (a "
                "loss that is not a mean over examples, or a forward that mixes them)"
            )
        kept = self._keep(tuple(total), curved)  # narrows self.params
        self.loss = whole
        self._gradient = torch.cat([g.reshape(-1) for g in kept])
        return None

    def _whole_loss(self) -> float:
        with torch.enable_grad(), _math_attention():
            return float(self._forward_loss(contextlib.nullcontext()).detach())

    def _block_grads(
        self, inputs: Any, loss: Loss, *, create_graph: bool
    ) -> tuple[float, tuple[torch.Tensor | None, ...]]:
        """One block's loss and gradient (with graph when ``create_graph``)."""
        with torch.enable_grad(), _math_attention():
            value = self._forward_loss(contextlib.nullcontext(), inputs, loss)
            try:
                grads = torch.autograd.grad(
                    value, self.params, create_graph=create_graph, allow_unused=True
                )
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # user code (a custom backward), an op, memory
                raise self._failure(
                    "the backward of a block of the batch", exc, _DIFFERENTIABLE, building=False
                ) from exc
        return float(value.detach()), grads

    def __exit__(self, *exc: object) -> None:
        self._cut, self._gradient = [], None
        super().__exit__(*exc)

    def gradient(self) -> torch.Tensor:
        if not self._cut:
            return super().gradient()
        flat, self._gradient = self._gradient, None  # handed over once: not held twice
        if flat is None:  # asked again (the optimizer's preconditioner, then Lanczos)
            total = None
            for inputs, loss in self._cut:
                _, grads = self._block_grads(inputs, loss, create_graph=False)
                total = _accumulate(total, grads, self.params)
            flat = torch.cat([g.reshape(-1) for g in total or ()])
        return self._summed(flat)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if not self._cut:
            return super().matvec(v)
        pieces, offset = [], 0
        for p in self.params:
            pieces.append(v[offset : offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()
        out = torch.zeros(self.n, dtype=v.dtype, device=v.device)
        for i, (inputs, loss) in enumerate(self._cut):
            try:
                self._add_block(out, pieces, inputs, loss)
            except (KeyboardInterrupt, NoCurvature):
                raise
            except BaseException as exc:  # user code (twice differentiated), an op, memory
                raise self._failure(
                    f"Hessian-vector product {self.products + 1} (block {i + 1} of {self.blocks})",
                    exc,
                    _DIFFERENTIABLE,
                    building=False,
                ) from exc
        self.products += 1
        return self._summed(out)

    def _add_block(
        self, out: torch.Tensor, pieces: list[torch.Tensor], inputs: Any, loss: Loss
    ) -> None:
        """``out`` += this block's H v (``pieces``: v by parameter)."""
        _, grads = self._block_grads(inputs, loss, create_graph=True)
        with torch.enable_grad():
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not used:
                return
            hv = torch.autograd.grad(
                [grads[i] for i in used],
                [self.params[i] for i in used],
                grad_outputs=[pieces[i] for i in used],
                allow_unused=True,
            )
        del grads
        starts = [0]
        for p in self.params:
            starts.append(starts[-1] + p.numel())
        for i, h in zip(used, hv, strict=True):
            if h is not None:
                out[starts[i] : starts[i + 1]] += h.reshape(-1).to(out.dtype)


def _accumulate(
    total: list[torch.Tensor] | None,
    grads: tuple[torch.Tensor | None, ...],
    params: list[torch.Tensor],
) -> list[torch.Tensor]:
    """``total`` + ``grads``, per parameter of ``params``, in float64 (a missing
    gradient is zero)."""
    if total is None:
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for t, g in zip(total, grads, strict=True):
        if g is not None:
            t += g.detach()
    return total
