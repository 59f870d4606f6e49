"""What nnhealth knows about each nonlinearity, in one table.

Per kind (the name the capture gives a nonlinearity call): its family (``relu``: passes a
gradient on one side, wants He init; ``sigmoid``: bounded, saturates, wants Xavier;
``linear``: SELU and plain linear outputs, want LeCun), its initialization rule, its peak
derivative, where its derivative vanishes, the torch callables that compute it and the
``torch.nn`` module classes that call them.

An initialization rule is one ``nn.init`` call (its name and keyword arguments): the fix
snippets render it as text and ``--what-if`` applies it in memory, from the same
definition. No torch at import: the analyzers read this table, and ``nnhealth checks``
must not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RELU = "relu"  # the ReLU family: He (Kaiming) init, Var(w) = 2/fan_in
SIGMOID = "sigmoid"  # bounded, saturating: Xavier (Glorot) init, Var(w) = 2/(fan_in + fan_out)
LINEAR = "linear"  # SELU and linear outputs: LeCun init, Var(w) = 1/fan_in


@dataclass(frozen=True)
class Init:
    """One ``nn.init`` call on a weight: ``nn.init.<function>(weight, <kwargs>)``.

    ``gain`` names the nonlinearity whose ``nn.init.calculate_gain`` is passed as
    ``gain=``; ``label`` is how ``--what-if`` names the rule.
    """

    function: str
    kwargs: tuple[tuple[str, str], ...] = ()
    gain: str | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.function

    def snippet(self, weight: str) -> str:
        """The call as Python text, on the weight expression ``weight``."""
        args = [weight] + [f'{k}="{v}"' for k, v in self.kwargs]
        if self.gain is not None:
            args.append(f'gain=nn.init.calculate_gain("{self.gain}")')
        return f"nn.init.{self.function}({', '.join(args)})"

    def apply(self, weight: Any) -> None:
        """Run the call on the tensor ``weight`` (in place)."""
        from torch import nn

        kwargs: dict[str, Any] = dict(self.kwargs)
        if self.gain is not None:
            kwargs["gain"] = nn.init.calculate_gain(self.gain)
        getattr(nn.init, self.function)(weight, **kwargs)


HE = Init("kaiming_normal_", (("nonlinearity", "relu"),))
HE_LEAKY = Init("kaiming_normal_", (("nonlinearity", "leaky_relu"),))
XAVIER = Init("xavier_normal_")
XAVIER_TANH = Init("xavier_normal_", gain="tanh")
XAVIER_SIGMOID = Init("xavier_normal_", gain="sigmoid")
LECUN = Init("kaiming_normal_", (("nonlinearity", "linear"),), label="LeCun init")


def _tanh_bounds(fraction: float) -> tuple[float, float]:
    t = math.sqrt(max(1.0 - fraction, 0.0))  # 1 - y^2 < c  <=>  |y| > sqrt(1 - c)
    return -t, t


def _sigmoid_bounds(fraction: float) -> tuple[float, float]:
    h = 0.5 * math.sqrt(max(1.0 - fraction, 0.0))  # y(1-y) < c/4  <=>  |y - 1/2| > sqrt(1-c)/2
    return 0.5 - h, 0.5 + h


Bounds = Callable[[float], tuple[float | None, float | None]]


@dataclass(frozen=True)
class Nonlinearity:
    kind: str
    family: str  # RELU, SIGMOID or LINEAR
    init: Init
    callables: tuple[str, ...] = ()  # "F.relu", "torch.relu", "T.relu" (tensor method)
    modules: tuple[str, ...] = ()  # torch.nn class names
    can_die: bool = False  # zero over a whole region: a unit can be dead (ReLU, ReLU6)
    peak: float | None = None  # the derivative's maximum, for the saturating kinds
    # piecewise linear: slope ``peak`` between flat parts where the derivative is 0
    hard: bool = False
    # saturated where y <= lo or y >= hi, given the fraction of the peak derivative
    # under which a value counts as saturated (the hard kinds: their flat parts)
    bounds: Bounds | None = None
    # the mean derivative's formula from the output's moments: "tanh", "sigmoid", "hard"
    derivative: str | None = None
    # the gain= the init rule passes (nn.init.calculate_gain(init.gain)); 1 without one
    gain: float = 1.0

    @property
    def hard_slope(self) -> float | None:
        return self.peak if self.hard else None


def _relu_like(kind: str, module: str, callables: tuple[str, ...], init: Init = HE):
    return Nonlinearity(kind, RELU, init, callables, (module,))


NONLINEARITIES: dict[str, Nonlinearity] = {
    n.kind: n
    for n in (
        Nonlinearity(
            "relu",
            RELU,
            HE,
            ("F.relu", "F.relu_", "torch.relu", "torch.relu_", "T.relu", "T.relu_"),
            ("ReLU",),
            can_die=True,
        ),
        Nonlinearity(
            "tanh",
            SIGMOID,
            XAVIER_TANH,
            ("F.tanh", "torch.tanh", "torch.tanh_", "T.tanh", "T.tanh_"),
            ("Tanh",),
            peak=1.0,
            bounds=_tanh_bounds,
            derivative="tanh",
            gain=5.0 / 3.0,
        ),
        Nonlinearity(
            "sigmoid",
            SIGMOID,
            XAVIER_SIGMOID,
            ("F.sigmoid", "torch.sigmoid", "torch.sigmoid_", "T.sigmoid", "T.sigmoid_"),
            ("Sigmoid",),
            peak=0.25,
            bounds=_sigmoid_bounds,
            derivative="sigmoid",
        ),
        # bounds of hardtanh's defaults (min_val -1, max_val 1); a call's own arguments win
        Nonlinearity(
            "hardtanh",
            SIGMOID,
            XAVIER_TANH,
            ("F.hardtanh", "F.hardtanh_"),
            ("Hardtanh",),
            peak=1.0,
            hard=True,
            bounds=lambda fraction: (-1.0, 1.0),
            derivative="hard",
            gain=5.0 / 3.0,
        ),
        Nonlinearity(
            "relu6",
            RELU,
            HE,
            ("F.relu6",),
            ("ReLU6",),
            can_die=True,
            peak=1.0,
            hard=True,
            bounds=lambda fraction: (None, 6.0),
            derivative="hard",
        ),
        Nonlinearity(
            "hardsigmoid",
            SIGMOID,
            XAVIER_SIGMOID,
            ("F.hardsigmoid",),
            ("Hardsigmoid",),
            peak=1.0 / 6.0,
            hard=True,
            bounds=lambda fraction: (0.0, 1.0),
            derivative="hard",
        ),
        _relu_like("gelu", "GELU", ("F.gelu",)),
        _relu_like("silu", "SiLU", ("F.silu",)),
        _relu_like("leaky_relu", "LeakyReLU", ("F.leaky_relu", "F.leaky_relu_"), HE_LEAKY),
        _relu_like("elu", "ELU", ("F.elu", "F.elu_")),
        Nonlinearity("selu", LINEAR, LECUN, ("F.selu", "torch.selu", "torch.selu_"), ("SELU",)),
        _relu_like("celu", "CELU", ("F.celu", "F.celu_")),
        _relu_like("mish", "Mish", ("F.mish",)),
        _relu_like("softplus", "Softplus", ("F.softplus",)),
        _relu_like("hardswish", "Hardswish", ("F.hardswish",)),
        _relu_like("prelu", "PReLU", ("F.prelu",), HE_LEAKY),
        _relu_like("rrelu", "RReLU", ("F.rrelu", "F.rrelu_"), HE_LEAKY),
        # a layer whose output goes on unchanged (another layer, or the model's output)
        Nonlinearity("linear", LINEAR, LECUN),
    )
}

# torch.nn module class name -> kind
MODULE_KINDS: dict[str, str] = {m: n.kind for n in NONLINEARITIES.values() for m in n.modules}


def lookup(kind: str | None) -> Nonlinearity | None:
    """The entry for ``kind``; None for an unknown (or no) nonlinearity."""
    return NONLINEARITIES.get(kind) if kind is not None else None


def family(kind: str | None) -> str | None:
    entry = lookup(kind)
    return None if entry is None else entry.family


def init_rule(kind: str | None) -> Init:
    """The variance-preserving init for layers feeding ``kind``: He for the ReLU family,
    Xavier (with the kind's gain) for the saturating ones, LeCun for everything else."""
    entry = lookup(kind)
    return LECUN if entry is None else entry.init


def hard_slope(kind: str | None) -> float:
    """The slope of a piecewise-linear kind between its flat parts (1 if unknown)."""
    entry = lookup(kind)
    slope = None if entry is None else entry.hard_slope
    return 1.0 if slope is None else slope
