"""Which torch callables are nonlinearities, and how each one is judged.

The capture matches the callables that reach ``TorchFunctionMode.__torch_function__``:
the functional API (``F.relu``), the torch namespace (``torch.tanh``) and tensor
methods (``x.sigmoid()``, ``x.relu_()``). Modules such as ``nn.ReLU`` and ``nn.ReLU6``
call these functionals, so one table covers both forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nnhealth.capture.stats import ActivationSpec

SpecFactory = Callable[[tuple, dict], ActivationSpec]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    return default


def build_table(derivative_fraction: float) -> dict[Callable, SpecFactory]:
    """Map each activation callable to a factory of its spec.

    ``derivative_fraction``: a value counts as saturated where the nonlinearity's
    derivative is below this fraction of its maximum (tanh: 1, sigmoid: 1/4).
    """
    c = float(derivative_fraction)
    t = math.sqrt(max(1.0 - c, 0.0))  # tanh: 1 - y^2 < c  <=>  |y| > sqrt(1 - c)
    h = 0.5 * t  # sigmoid: y(1-y) < c/4  <=>  |y - 1/2| > sqrt(1 - c)/2
    tanh = ActivationSpec("tanh", sat_lo=-t, sat_hi=t, derivative="tanh")
    sigmoid = ActivationSpec("sigmoid", sat_lo=0.5 - h, sat_hi=0.5 + h, derivative="sigmoid")
    relu = ActivationSpec("relu", can_die=True)
    hardsigmoid = ActivationSpec("hardsigmoid", sat_lo=0.0, sat_hi=1.0, derivative="hard")

    def hardtanh(args: tuple, kwargs: dict) -> ActivationSpec:
        lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
        hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
        if lo == 0.0:  # ReLU6 and friends: the zero region is "dead", the top saturates
            kind = "relu6" if hi == 6.0 else "hardtanh"
            return ActivationSpec(kind, can_die=True, sat_hi=hi, derivative="hard")
        return ActivationSpec("hardtanh", sat_lo=lo, sat_hi=hi, derivative="hard")

    relu6 = ActivationSpec("relu6", can_die=True, sat_hi=6.0, derivative="hard")

    def const(spec: ActivationSpec) -> SpecFactory:
        return lambda args, kwargs: spec

    groups: list[tuple[SpecFactory, list[str]]] = [
        (const(relu), ["F.relu", "F.relu_", "torch.relu", "torch.relu_", "T.relu", "T.relu_"]),
        (const(tanh), ["F.tanh", "torch.tanh", "torch.tanh_", "T.tanh", "T.tanh_"]),
        (
            const(sigmoid),
            ["F.sigmoid", "torch.sigmoid", "torch.sigmoid_", "T.sigmoid", "T.sigmoid_"],
        ),
        (hardtanh, ["F.hardtanh", "F.hardtanh_"]),
        (const(relu6), ["F.relu6"]),
        (const(hardsigmoid), ["F.hardsigmoid"]),
    ]
    for kind, names in {
        "gelu": ["F.gelu"],
        "silu": ["F.silu"],
        "leaky_relu": ["F.leaky_relu", "F.leaky_relu_"],
        "elu": ["F.elu", "F.elu_"],
        "selu": ["F.selu", "torch.selu", "torch.selu_"],
        "celu": ["F.celu", "F.celu_"],
        "mish": ["F.mish"],
        "softplus": ["F.softplus"],
        "hardswish": ["F.hardswish"],
        "prelu": ["F.prelu"],
        "rrelu": ["F.rrelu", "F.rrelu_"],
    }.items():
        groups.append((const(ActivationSpec(kind)), names))

    namespaces = {"F": F, "torch": torch, "T": torch.Tensor}
    table: dict[Callable, SpecFactory] = {}
    for factory, names in groups:
        for dotted in names:
            ns, attr = dotted.split(".")
            fn = getattr(namespaces[ns], attr, None)
            if fn is not None:
                table[fn] = factory
    return table
