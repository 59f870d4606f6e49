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
from dataclasses import dataclass, replace
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
    # ``nn.init.normal_`` with Var(w) = variance / fan: ``fan`` the layer's fan-in when
    # given, else the weight's row length ``w[0].numel()`` (the fan-in of Linear and Conv)
    variance: float | None = None
    fan: int | None = None

    @property
    def name(self) -> str:
        return self.label or self.function

    def with_fan(self, fan: int) -> Init:
        """This variance rule for a layer whose fan-in is not its weight's row length (a
        transposed convolution); a rule given by a function of torch's, as it is."""
        if self.variance is None:
            return self
        return replace(self, fan=fan)

    def snippet(self, weight: str) -> str:
        """The call as Python text, on the weight expression ``weight``."""
        if self.variance is not None:
            fan = str(self.fan) if self.fan is not None else f"{weight}[0].numel()"
            return f"nn.init.normal_({weight}, std=({self.variance:.4g} / {fan}) ** 0.5)"
        args = [weight] + [f'{k}="{v}"' for k, v in self.kwargs]
        if self.gain is not None:
            args.append(f'gain=nn.init.calculate_gain("{self.gain}")')
        return f"nn.init.{self.function}({', '.join(args)})"

    def apply(self, weight: Any) -> None:
        """Run the call on the tensor ``weight`` (in place)."""
        from torch import nn

        if self.variance is not None:
            fan = self.fan if self.fan is not None else weight[0].numel()
            nn.init.normal_(weight, std=(float(f"{self.variance:.4g}") / fan) ** 0.5)
            return
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


def he(fan: int) -> Init:
    """He init for a layer of fan-in ``fan``: Var(w) = 2 / fan."""
    return Init("normal_", label="He init", variance=2.0, fan=fan)


def second_moment_init(kind: str, variance: float) -> Init:
    """The variance-preserving init for a nonlinearity f that is not positively
    homogeneous (GELU, SiLU...): Var(w) = variance / fan_in with variance = 1 / E[f(z)^2],
    z ~ N(0, 1), so a unit-variance pre-activation gives a unit-variance one in the next
    layer (ReLU: E = 1/2, He's 2/fan_in)."""
    return Init(
        "normal_", label=f"He-style init for {kind} (gain {variance**0.5:.3g})", variance=variance
    )


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
    # the gain of the init rule (nn.init.calculate_gain(init.gain), or sqrt of its
    # variance rule's numerator over 2 for the ReLU family's smooth kinds); 1 without one
    gain: float = 1.0

    @property
    def hard_slope(self) -> float | None:
        return self.peak if self.hard else None


def _relu_like(kind: str, module: str, callables: tuple[str, ...], init: Init = HE):
    return Nonlinearity(kind, RELU, init, callables, (module,))


# 1 / E[f(z)^2] for z ~ N(0, 1), by quadrature (tests/test_nonlinearities.py checks them)
_INVERSE_SECOND_MOMENT = {
    "gelu": 2.352,
    "silu": 2.811,
    "mish": 2.211,
    "hardswish": 3.016,
    "elu": 1.551,
    "celu": 1.551,
    "softplus": 1.085,
}


def _smooth(kind: str, module: str, callables: tuple[str, ...]) -> Nonlinearity:
    """A ReLU-like kind with a smooth or shifted negative side: its own gain."""
    variance = _INVERSE_SECOND_MOMENT[kind]
    init = second_moment_init(kind, variance)
    return Nonlinearity(kind, RELU, init, callables, (module,), gain=variance**0.5)


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
        _smooth("gelu", "GELU", ("F.gelu",)),
        _smooth("silu", "SiLU", ("F.silu",)),
        _relu_like("leaky_relu", "LeakyReLU", ("F.leaky_relu", "F.leaky_relu_"), HE_LEAKY),
        _smooth("elu", "ELU", ("F.elu", "F.elu_")),
        Nonlinearity("selu", LINEAR, LECUN, ("F.selu", "torch.selu", "torch.selu_"), ("SELU",)),
        _smooth("celu", "CELU", ("F.celu", "F.celu_")),
        _smooth("mish", "Mish", ("F.mish",)),
        _smooth("softplus", "Softplus", ("F.softplus",)),
        _smooth("hardswish", "Hardswish", ("F.hardswish",)),
        _relu_like("prelu", "PReLU", ("F.prelu",), HE_LEAKY),
        _relu_like("rrelu", "RReLU", ("F.rrelu", "F.rrelu_"), HE_LEAKY),
        # a layer whose output goes on unchanged (another layer, or the model's output)
        Nonlinearity("linear", LINEAR, LECUN),
    )
}

# torch.nn module class name -> kind
MODULE_KINDS: dict[str, str] = {m: n.kind for n in NONLINEARITIES.values() for m in n.modules}


# activation classes of other libraries by the end of their (lower-case) name, after
# "activation", timm's "me" and a "tanh" after "gelu" are taken off: Hugging Face's
# NewGELUActivation, GELUActivation, FastGELUActivation, QuickGELUActivation,
# SiLUActivation, MishActivation, GELUTanh; timm's GELU, GELUTanh, QuickGELU, Swish,
# SwishMe, Mish, HardSwish, HardSigmoid. First match wins; None: not classified (HardMish).
_NAME_ENDINGS: tuple[tuple[str, str | None], ...] = (
    ("hardmish", None),
    ("hardswish", "hardswish"),
    ("hardsigmoid", "hardsigmoid"),
    ("gelu", "gelu"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("mish", "mish"),
)


def module_kind(class_name: str) -> str | None:
    """The nonlinearity a module class computes, by its name: torch.nn's own classes,
    and other libraries' activation modules (whatever ops they are written with: HF's
    NewGELUActivation computes 0.5 x (1 + tanh(...)) and is GELU, not tanh)."""
    if class_name in MODULE_KINDS:
        return MODULE_KINDS[class_name]
    low = class_name.lower().removesuffix("activation").removesuffix("me")
    if low.endswith("gelutanh"):
        low = low.removesuffix("tanh")
    return next((kind for ending, kind in _NAME_ENDINGS if low.endswith(ending)), None)


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
