"""Which torch callables are nonlinearities, and how each one is judged.

The capture matches the callables that reach ``TorchFunctionMode.__torch_function__``:
the functional API (``F.relu``), the torch namespace (``torch.tanh``) and tensor
methods (``x.sigmoid()``, ``x.relu_()``). Modules such as ``nn.ReLU`` and ``nn.ReLU6``
call these functionals, so one table covers both forms. The callables and how each
kind saturates come from ``nnhealth.nonlinearities``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nnhealth.capture.stats import ActivationSpec
from nnhealth.nonlinearities import NONLINEARITIES, Nonlinearity

SpecFactory = Callable[[tuple, dict], ActivationSpec]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


def spec(entry: Nonlinearity, derivative_fraction: float) -> ActivationSpec:
    """How a call of ``entry`` with its default arguments is judged."""
    lo, hi = (None, None) if entry.bounds is None else entry.bounds(derivative_fraction)
    return ActivationSpec(
        entry.kind, can_die=entry.can_die, sat_lo=lo, sat_hi=hi, derivative=entry.derivative
    )


def _hardtanh(args: tuple, kwargs: dict) -> ActivationSpec:
    """hardtanh's bounds are its arguments (min_val, max_val)."""
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    if lo == 0.0:  # ReLU6 and friends: the zero region is "dead", the top saturates
        kind = "relu6" if hi == 6.0 else "hardtanh"
        return ActivationSpec(kind, can_die=True, sat_hi=hi, derivative="hard")
    return ActivationSpec("hardtanh", sat_lo=lo, sat_hi=hi, derivative="hard")


# kinds whose spec depends on the call's arguments
_BY_ARGUMENTS: dict[str, SpecFactory] = {"hardtanh": _hardtanh}


def build_table(derivative_fraction: float) -> dict[Callable, SpecFactory]:
    """Map each activation callable to a factory of its spec.

    ``derivative_fraction``: a value counts as saturated where the nonlinearity's
    derivative is below this fraction of its maximum (tanh: 1, sigmoid: 1/4).
    """
    c = float(derivative_fraction)
    namespaces = {"F": F, "torch": torch, "T": torch.Tensor}
    table: dict[Callable, SpecFactory] = {}
    for entry in NONLINEARITIES.values():
        fixed = spec(entry, c)
        factory = _BY_ARGUMENTS.get(entry.kind, lambda args, kwargs, s=fixed: s)
        for dotted in entry.callables:
            ns, attr = dotted.split(".")
            fn = getattr(namespaces[ns], attr, None)
            if fn is not None:
                table[fn] = factory
    return table
