"""Hessian-vector products by central differences of gradients, when the double
backward cannot be had (an op without a second derivative, such as hardsigmoid) or
trusted (a custom backward marked @once_differentiable, or one that detaches):

    H v ~ D(v) = (g(w + e v) - g(w - e v)) / (2 e),    g = the loss gradient

First derivatives only: two forward+backward passes per product, on shifted copies of
the parameters passed by torch.func.functional_call. They run on a float64 copy of the
model (rounding, below, is what limits finite differences; the copy holds the same
weights exactly) or, when it cannot be copied or run in float64, on the model itself,
whose parameters (values, requires_grad, .grad) are then never written; its modes,
buffers (BatchNorm running statistics) and RNG are set and restored as for exact
products (hvp.enter_products).

The step. Taylor: D(v) = Hv + (e^2/6) D^3g[v,v,v] + O(e^4), the truncation. Rounding:
w +- e v is stored with unit roundoff u, so each step is off by about u|w|, which H
maps to about u |H| |w|; divided by e. With the loss varying on the scale of the
weights (|D^3g| ~ |H| / |w|^2) and t = e |v| / |w| the step relative to them, the
relative error of a product is about t^2/6 + u/t, least at t = (3u)^(1/3), where it is
(3u)^(2/3)/2: 1.6e-5 in float32, 2.4e-11 in float64. Hence the first step tried,
e0 = (3u)^(1/3) max(|w|, 1) / |v|. That model of scales fails where the loss bends
on a far smaller scale (BatchNorm over a handful of values in train mode: on
mobilenet_v3_small with a batch of 4, e0 is off by 100%, e0/100 right to 1e-8), so the
step is calibrated on the first vector: e0, e0/4, e0/16, ... while successive products
D_k, D_k+1 come closer; the step kept is the larger of the closest pair, and
|D_k - D_k+1| / |D_k| its estimated error (about its truncation when truncation
dominates, about its rounding when rounding does). The error is measured again at the
top Ritz vector y, as |D_2e(y) - D_e(y)| (3x the truncation of D_e, or about 1.1x its
rounding): lambda_max's error bar is the Ritz residual plus that (the first-order shift
of an eigenvalue, y.E y, is at most |E y|): an estimate, never a certificate.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Self

import torch
from torch import nn
from torch.func import functional_call

from nnhealth._util import escaped, out_of_memory
from nnhealth.curvature import trust
from nnhealth.curvature.hvp import NoCurvature, ProductOperator, enter_products
from nnhealth.errors import NnhealthError

MAX_ERROR = 0.05  # a product's estimated relative error above which none is trusted
_SHRINK = 4.0  # the calibration divides the step by this each time
_TRIES = 16  # steps tried at most: e0 down to e0 / 4^15 (1e-9 e0)
_SETTLED = 1e-6  # products changing less than this between steps: the step is kept


def relative_step(dtype: torch.dtype) -> float:
    """t = (3u)^(1/3): the step relative to the weights (see the module docstring)."""
    return (3 * torch.finfo(dtype).eps / 2) ** (1 / 3)  # eps / 2: the unit roundoff


def _call(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> Any:
    """The model's forward on ``params`` instead of its own (as call_model calls it)."""
    if isinstance(inputs, dict):
        return functional_call(model, params, (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, params, tuple(inputs))
    return functional_call(model, params, (inputs,))


def _wide(inputs: Any) -> Any:
    """``inputs`` with every floating-point tensor in float64."""
    if isinstance(inputs, torch.Tensor):
        return inputs.double() if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _wide(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_wide(v) for v in inputs) if type(inputs) in (tuple, list) else inputs
    return inputs


def _float64_copy(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A float64 copy of the model (None and why not, when it cannot be made)."""
    if all(p.dtype == torch.float64 for p in model.parameters()):
        return None, ""
    try:
        return copy.deepcopy(model).double(), ""
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 (a module that refuses copying: user code)
        return None, f"deepcopy {escaped(exc)}"


class FiniteDifferenceOperator(ProductOperator):
    """``matvec(v)`` ~ H v by central differences of gradients (HessianOperator's
    interface). Use as a context manager: set up on entry, restored on exit. Its
    ``functions`` stay empty: first derivatives need no audit."""

    backend = "finite differences"
    loss = math.nan  # at the weights, once entered
    relative = 0.0  # the calibrated step relative to max(|w|, 1)
    calibration_error = math.nan  # the estimated relative error it leaves
    weight_scale = 1.0
    _g0: torch.Tensor | None = None

    def __enter__(self) -> Self:
        if isinstance(self.model, torch.jit.ScriptModule):
            raise NoCurvature(
                "finite differences pass shifted parameters through torch.func.functional_call, "
                "which a TorchScript module does not take"
            )
        if not any(p.requires_grad for p in self.model.parameters()):
            raise NoCurvature("the model has no trainable parameters: there is no Hessian")
        wide, why = _float64_copy(self.model)
        if wide is not None:
            try:
                return self._enter(wide, _wide(self.inputs))
            except NoCurvature as exc:
                why = exc.message
        if why:
            self.notes.append(
                f"finite differences in the model's own dtype (a float64 copy failed: {why}): "
                "rounding limits their accuracy"
            )
        return self._enter(self.model, self.inputs)

    def _enter(self, model: nn.Module, inputs: Any) -> Self:
        """Set up on ``model`` (the float64 copy or the model itself): the gradient at the
        weights, the parameters that have one."""
        self.work, self.work_inputs = model, inputs
        self.named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self._stack = contextlib.ExitStack()
        try:
            enter_products(self._stack, model, self.mode, self.seed, self.notes)
            grads = self._gradient(None, 0.0)
            kept = [i for i, g in enumerate(grads) if g is not None]
            if not kept:
                raise NoCurvature("no trainable parameter has a gradient: there is no Hessian")
            if len(kept) < len(self.named):
                self.notes.append(
                    f"{len(self.named) - len(kept)} parameter tensor(s) are unused by the loss "
                    "and are left out of the Hessian"
                )
            self.named = [self.named[i] for i in kept]
            self.params = [p for _, p in self.named]
            self.n = sum(p.numel() for p in self.params)
            self._g0 = _flat([grads[i] for i in kept], self.params)
            scale = float(torch.linalg.vector_norm(_flat(self.params, self.params)))
            self.weight_scale = max(scale, 1.0)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._g0 = None
        if self._stack is not None:
            self._stack.close()

    @property
    def dtype(self) -> torch.dtype:
        """The coarsest dtype of the parameters products are taken on."""
        return max((p.dtype for p in self.params), key=lambda d: torch.finfo(d).eps)

    @property
    def asymmetry_floor(self) -> float:
        """The symmetry statistic S the products' own error explains: sqrt(n) times it
        (truncation is not random, so u.e can be all of |e|, not |e| / sqrt(n))."""
        return math.sqrt(self.n) * self.calibration_error

    def gradient(self) -> torch.Tensor:
        """The loss gradient at the weights, flat float64 (Lanczos's start vector)."""
        if self._g0 is None:
            raise RuntimeError("FiniteDifferenceOperator.gradient outside its context")
        return self._g0 if self.reduce is None else self._summed(self._g0.clone())

    def step(self, v: torch.Tensor) -> float:
        """e for the product on ``v``: the calibrated step times max(|w|, 1) / |v|."""
        norm = float(torch.linalg.vector_norm(v))
        return self.relative * self.weight_scale / norm if norm else 0.0

    def matvec(self, v: torch.Tensor, step: float | None = None) -> torch.Tensor:
        """D(v) in float64 (the first call calibrates the step on ``v``); ``step``: e,
        instead of the calibrated one."""
        if self._g0 is None:
            raise RuntimeError("FiniteDifferenceOperator.matvec outside its context")
        if not self.relative and step is None:
            return self._calibrate(v)
        e = self.step(v) if step is None else step
        if e == 0:
            return torch.zeros_like(self._g0)
        plus = _flat(self._gradient(v, e), self.params)
        minus = _flat(self._gradient(v, -e), self.params)
        self.products += 1
        # summed per product; a calibration (above) is built from these, already summed
        return self._summed(plus.sub_(minus).div_(2 * e))

    def _calibrate(self, v: torch.Tensor) -> torch.Tensor:
        """Choose the step on ``v`` (see the module docstring); D(v) at it."""
        norm = float(torch.linalg.vector_norm(v))
        if norm == 0:
            return torch.zeros_like(self.gradient())
        first = relative_step(self.dtype) * self.weight_scale / norm
        steps = [first / _SHRINK**k for k in range(_TRIES)]
        products = [self.matvec(v, steps[0])]
        best = (math.inf, 0)
        for k in range(1, _TRIES):
            products.append(self.matvec(v, steps[k]))
            size = float(torch.linalg.vector_norm(products[k - 1]))
            change = float(torch.linalg.vector_norm(products[k - 1] - products[k]))
            rel = change / size if size else (0.0 if change == 0 else math.inf)
            if rel < best[0]:
                best = (rel, k - 1)
            elif best[0] <= MAX_ERROR and rel > 2 * best[0]:
                break  # settled, then rounding took over
            if rel <= _SETTLED:
                break
        error, k = best
        if not error <= MAX_ERROR:
            raise NoCurvature(
                "finite differences of gradients do not settle here: over steps from "
                f"{steps[0]:.2g} down to {steps[len(products) - 1]:.2g}, products still "
                f"change by {error:.2g} of their size (the loss is not smooth on any "
                "step its rounding allows: kinks, or a normalization over very few values)"
            )
        self.relative = steps[k] * norm / self.weight_scale
        self.calibration_error = error
        return products[k]

    def _gradient(self, v: torch.Tensor | None, e: float) -> list[torch.Tensor | None]:
        """The gradient at w + e v (at w when ``v`` is None), per parameter tensor."""
        leaves, offset = {}, 0
        for name, p in self.named:
            w = p.detach()
            if v is not None:
                piece = v[offset : offset + p.numel()].view(p.shape)
                w = (w.to(torch.float64) + e * piece).to(p.dtype)
                offset += p.numel()
            leaves[name] = w.clone().requires_grad_(True)
        what = "a gradient for finite-difference Hessian products"
        torch.default_generator.manual_seed(self.seed)  # the same random ops every time
        with torch.enable_grad():
            try:
                loss = self.make_loss(_call(self.work, leaves, self.work_inputs))
            except KeyboardInterrupt:
                raise
            except NnhealthError as exc:
                raise NoCurvature(f"the loss for Hessian products failed: {exc.message}") from exc
            except BaseException as exc:  # the user's model and loss
                raise self._failure(f"the forward for {what}", exc) from exc
            if v is None:
                self.loss = float(loss.detach())
            if not loss.requires_grad:
                raise NoCurvature(
                    "the loss does not depend on any trainable parameter through autograd: "
                    "there is no Hessian to measure"
                )
            try:
                return list(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a custom backward, a hook: user code
                raise self._failure(f"the backward for {what}", exc) from exc

    def _failure(self, what: str, exc: BaseException) -> NoCurvature:
        if out_of_memory(exc):
            return NoCurvature(trust.oom_reason(f"in {what}", exc, lanczos=False))
        return NoCurvature(trust.user_failure(what, exc, [], ""))


def _flat(tensors: list[Any], like: list[torch.Tensor]) -> torch.Tensor:
    """One float64 vector (None: zeros of the matching parameter's size)."""
    return torch.cat(
        [
            (torch.zeros_like(p) if t is None else t.detach()).reshape(-1).to(torch.float64)
            for t, p in zip(tensors, like, strict=True)
        ]
    )


def product_error(op: FiniteDifferenceOperator, y: torch.Tensor) -> tuple[float, float]:
    """(|D_2e(y) - D_e(y)|, |D_e(y)|): the estimated error of a product at ``y`` and the
    product's size (two products)."""
    e = op.step(y)
    at_e = op.matvec(y, e)
    at_2e = op.matvec(y, 2 * e)
    return float(torch.linalg.vector_norm(at_2e - at_e)), float(torch.linalg.vector_norm(at_e))
