"""The optimizer a scan judges the learning rate for.

Which one: ``--optimizer`` (and ``--momentum``/``--betas``/``--eps``/``--weight-decay``),
else the optimizer saved with the model (its class from the param-group keys, its lr
after the scheduler, its per-parameter state), else plain SGD; ``Optimizer.source``
says which and why.

What it gives the checks:

- the stability limit on the quadratic model, ``lr < factor / lambda_max(P^-1 H)``
  (``limit_factor``): SGD 2; heavy-ball momentum beta (PyTorch's form, buf = beta*buf +
  (1-dampening)*g) (2+2beta)/(1-dampening); Nesterov (2+2beta)/(1+2beta); Adam, AdamW and
  LAMB (2+2beta1)/(1-beta1), 38 at beta1 = 0.9 (Cohen et al., "Adaptive Gradient Methods
  at the Edge of Stability", 2022); RMSprop and LARS 2+2beta with their momentum;
- the diagonal preconditioner P^-1 each step is scaled by (``diagonal``): Adam's
  1/(sqrt(v_hat)+eps) with v from ``exp_avg_sq`` updated by this batch's gradient (or,
  with no state, Adam's first step, v_hat = g^2), RMSprop's 1/(sqrt(v)+eps), LARS's and
  LAMB's layer-wise trust ratios, and each parameter group's lr relative to the first;
- the update it would make now (``update``): ``torch.optim``'s own step on a copy of
  one parameter at a time, from the saved state (LARS and LAMB, which torch does not
  ship, by their papers' formulas).

No torch at import: analyzers read ``summary()``'s plain dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nnhealth.errors import UsageError, flag

if TYPE_CHECKING:
    import torch

KINDS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "lars", "lamb")
ADAPTIVE = frozenset({"adam", "adamw", "rmsprop"})  # a per-coordinate preconditioner
# a step rescaled per layer at every step (lr * eta * ||w|| for LARS, lr * ||w|| for LAMB):
# no fixed curvature limit (a frozen-P model predicts neither; tests/test_optimizer_limits)
LAYERWISE = frozenset({"lars", "lamb"})
DECOUPLED = frozenset({"adamw", "lamb"})  # weight decay applied to w, not added to g
LARS_ETA = 1e-3  # the trust coefficient of You et al. (2017)
_NAMES = {
    "sgd": "SGD",
    "momentum": "SGD with momentum",
    "nesterov": "SGD with Nesterov momentum",
    "adam": "Adam",
    "adamw": "AdamW",
    "rmsprop": "RMSprop",
    "lars": "LARS",
    "lamb": "LAMB",
}
# the state each optimizer's step reads: a saved state of another family is not used
_STATE_KEYS = {
    "momentum": ("momentum_buffer",),
    "nesterov": ("momentum_buffer",),
    "lars": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "lamb": ("exp_avg", "exp_avg_sq"),
    "rmsprop": ("square_avg",),
}


@dataclass(frozen=True)
class Optimizer:
    """One optimizer's hyper-parameters, its saved per-parameter state, and why."""

    kind: str = "sgd"
    lr: float | None = None
    momentum: float = 0.0
    dampening: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99  # RMSprop's smoothing constant
    weight_decay: float = 0.0
    centered: bool = False
    amsgrad: bool = False
    trust: float = LARS_ETA
    source: str = "no optimizer given or saved with the model: plain SGD assumed"
    lr_source: str | None = None
    # parameter name -> its saved state (tensors) / its group's lr / weight decay
    state: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    param_lr: dict[str, float] = field(default_factory=dict, compare=False)
    param_weight_decay: dict[str, float] = field(default_factory=dict, compare=False)
    step: int | None = None
    # the parameters the saved optimizer steps (None: all); the others are not trained
    members: frozenset[str] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        base = _NAMES[self.kind]
        if self.kind in ("momentum", "nesterov", "lars", "rmsprop") and self.momentum:
            return f"{base} {self.momentum:g}"
        return base

    @property
    def adaptive(self) -> bool:
        return self.kind in ADAPTIVE

    @property
    def layerwise_kind(self) -> str:
        """The layer-wise counterpart: LAMB for the Adam family, LARS otherwise."""
        return "lamb" if self.kind in ("adam", "adamw", "lamb") else "lars"

    @property
    def plain_sgd(self) -> bool:
        """Plain SGD at one rate without weight decay: the step is -lr * g."""
        return (
            self.kind == "sgd"
            and self.members is None
            and not self.weight_decay
            and not any(self.param_weight_decay.values())
            and all(v == self.lr for v in self.param_lr.values())
        )

    @property
    def has_state(self) -> bool:
        return bool(self.state)

    def limit_factor(self) -> float:
        """c in lr < c / lambda_max(P^-1 H): where the iteration on a quadratic with that
        top eigenvalue stops contracting (the roots of its characteristic polynomial
        leave the unit disc)."""
        b = self.momentum
        if self.kind in ("adam", "adamw", "lamb"):
            b1 = self.betas[0]
            return (2 + 2 * b1) / (1 - b1)
        if self.kind == "nesterov":
            return (2 + 2 * b) / (1 + 2 * b)
        if self.kind == "momentum":
            return (2 + 2 * b) / (1 - self.dampening)
        if self.kind in ("rmsprop", "lars"):
            return 2 + 2 * b
        return 2.0

    def suggest_factor(self) -> float:
        """c' in the rate to suggest, c' / lambda_max: 1 for SGD (the optimal step on the
        top eigendirection); with momentum beta (1-beta)/(1-dampening), the rate whose
        effective step lr*(1-dampening)/(1-beta) is SGD's 1/lambda (half the limit,
        1.9/lambda at 0.9, still diverges in practice: tests/test_optimizer_limits.py);
        Adam and AdamW half their limit, 19/lambda(P^-1 H) at beta1 0.9."""
        if self.kind in ("adam", "adamw"):
            return self.limit_factor() / 2
        if self.kind in ("momentum", "nesterov", "rmsprop"):
            return (1 - self.momentum) / (1 - self.dampening)
        return 1.0

    def limit_formula(self) -> str:
        """The limit as the report writes it."""
        lam = "lambda_max(P^-1 H)" if self.preconditioned_kind else "lambda_max"
        if self.kind in ("adam", "adamw", "lamb"):
            return f"(2+2*beta1)/((1-beta1)*{lam})"
        if self.kind == "nesterov":
            return f"(2+2*beta)/((1+2*beta)*{lam})"
        if self.kind == "momentum":
            damp = f"(1-{self.dampening:g})*" if self.dampening else ""
            return f"(2+2*beta)/({damp}{lam})"
        if self.kind in ("rmsprop", "lars") and self.momentum:
            return f"(2+2*beta)/{lam}"
        return f"2/{lam}"

    @property
    def preconditioned_kind(self) -> bool:
        return self.adaptive

    def summary(self) -> dict[str, Any]:
        """What the report and the checks read (plain values)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.name,
            "lr": self.lr,
            "lr_source": self.lr_source,
            "source": self.source,
            "limit_factor": self.limit_factor(),
            "suggest_factor": self.suggest_factor(),
            "limit_formula": self.limit_formula(),
            "adaptive": self.adaptive,
            # each parameter's update is the optimizer's own step (False: lr * grad)
            "own_step": not self.plain_sgd,
            "layerwise": self.kind in LAYERWISE,
            "state": self.has_state,
            "step": self.step,
            "weight_decay": self.weight_decay,
        }
        if self.kind in ("momentum", "nesterov", "lars", "rmsprop"):
            out["momentum"] = self.momentum
        if self.kind == "momentum" and self.dampening:
            out["dampening"] = self.dampening
        if self.kind in ("adam", "adamw", "lamb"):
            out["betas"] = list(self.betas)
        if self.adaptive or self.kind == "lamb":
            out["eps"] = self.eps
        if self.kind == "rmsprop":
            out["alpha"] = self.alpha
        if self.kind == "lars":
            out["trust"] = self.trust
        return out

    def lr_of(self, name: str) -> float | None:
        if self.members is not None and name not in self.members:
            return 0.0  # outside the optimizer: never stepped
        return self.param_lr.get(name, self.lr)

    def weight_decay_of(self, name: str) -> float:
        return self.param_weight_decay.get(name, self.weight_decay)

    # --- what one step does -------------------------------------------------------

    def torch_group(self, name: str) -> dict[str, Any]:
        """The torch.optim param-group hyper-parameters of ``name``'s group."""
        lr, wd = self.lr_of(name), self.weight_decay_of(name)
        if self.kind in ("sgd", "momentum", "nesterov"):
            return {
                "lr": lr,
                "momentum": self.momentum,
                "dampening": self.dampening,
                "nesterov": self.kind == "nesterov",
                "weight_decay": wd,
            }
        if self.kind in ("adam", "adamw"):
            return {
                "lr": lr,
                "betas": self.betas,
                "eps": self.eps,
                "weight_decay": wd,
                "amsgrad": self.amsgrad,
            }
        return {
            "lr": lr,
            "alpha": self.alpha,
            "eps": self.eps,
            "weight_decay": wd,
            "momentum": self.momentum,
            "centered": self.centered,
        }

    def torch_class(self) -> type | None:
        """The torch.optim class that implements this optimizer (None: LARS, LAMB)."""
        import torch

        return {
            "sgd": torch.optim.SGD,
            "momentum": torch.optim.SGD,
            "nesterov": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
        }.get(self.kind)

    def saved_state(self, name: str) -> dict[str, Any]:
        """``name``'s saved state when it is this optimizer's kind of state, else {}."""
        state = self.state.get(name) or {}
        keys = _STATE_KEYS.get(self.kind, ())
        if not keys or not all(k in state for k in keys):
            return {}
        return state

    def update(self, name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        """The change one step makes to ``param`` now (new minus old), given this batch's
        gradient ``grad`` and the saved state; None without a learning rate, or for a
        parameter outside the optimizer."""
        if self.lr_of(name) is None or (self.members is not None and name not in self.members):
            return None
        import torch

        with torch.no_grad():
            if self.kind in ("lars", "lamb"):
                return -self.lr_of(name) * self._layerwise(name, param, grad)[0]
            # half precision would round most of one step away: a float32 copy takes it
            wide = torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else None
            copy = param.detach().to(wide or param.dtype, copy=True).requires_grad_(True)
            copy.grad = grad.detach().to(copy.dtype).clone()
            cls = self.torch_class()
            opt = cls([copy], **self.torch_group(name))
            state = self.saved_state(name)
            if state:
                opt.load_state_dict(
                    {
                        "state": {0: _state_for_torch(state)},
                        "param_groups": [{**opt.param_groups[0], "params": [0]}],
                    }
                )
            opt.step()
            return copy.detach() - param.detach().to(copy.dtype)

    def _moments(
        self, name: str, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """Adam's m and v after this batch's gradient (float64), the new step count, and
        whether they come from saved state."""
        import torch

        g = grad.detach().to(torch.float64)
        b1, b2 = self.betas
        state = self.saved_state(name) if self.kind in ("adam", "adamw", "lamb") else {}
        if not state:
            return (1 - b1) * g, (1 - b2) * g * g, 1, False
        m = b1 * state["exp_avg"].to(torch.float64) + (1 - b1) * g
        v = b2 * state["exp_avg_sq"].to(torch.float64) + (1 - b2) * g * g
        if self.amsgrad and "max_exp_avg_sq" in state:
            v = torch.maximum(v, state["max_exp_avg_sq"].to(torch.float64))
        return m, v, int(_step(state.get("step", 0))) + 1, True

    def _adam_denominator(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """sqrt(v_hat) + eps, float64."""
        _, v, t, _ = self._moments(name, grad)
        return (v / (1 - self.betas[1] ** t)).sqrt() + self.eps

    def _rmsprop_denominator(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        import torch

        g = grad.detach().to(torch.float64)
        state = self.saved_state(name)
        a = self.alpha
        v = (1 - a) * g * g
        if state:
            v = v + a * state["square_avg"].to(torch.float64)
        if self.centered:
            avg = (1 - a) * g
            if state.get("grad_avg") is not None:
                avg = avg + a * state["grad_avg"].to(torch.float64)
            v = v - avg * avg
        return v.clamp_min(0).sqrt() + self.eps

    def _layerwise(
        self, name: str, param: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One LARS or LAMB step's direction (the update is -lr times it) and the state
        after it. LARS: the momentum buffer of eta * ||w|| / ||g + wd w|| * (g + wd w);
        LAMB: ||w|| / ||r|| * r, r = m_hat / (sqrt(v_hat)+eps) + wd w. In float64."""
        import torch

        w = param.detach().to(torch.float64)
        wd = self.weight_decay_of(name)
        if self.kind == "lars":
            d = grad.detach().to(torch.float64) + wd * w
            ratio = _ratio(w, d, self.trust) if param.ndim > 1 else 1.0
            state = self.saved_state(name)
            step = ratio * d
            if state and self.momentum:
                step = self.momentum * state["momentum_buffer"].to(torch.float64) + step
            return step.to(param.dtype), {"momentum_buffer": step}
        m, v, t, _ = self._moments(name, grad)
        b1, b2 = self.betas
        r = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps) + wd * w
        return (_ratio(w, r, 1.0) * r).to(param.dtype), {"exp_avg": m, "exp_avg_sq": v, "step": t}

    def diagonal(
        self, names: list[str], params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """The flat float64 diagonal of each coordinate's step relative to ``lr``
        (lr_p / lr * P^-1), None when it is the identity; the coupled weight decay per
        coordinate (it adds wd to the Hessian's diagonal, None when there is none);
        and how P was had."""
        import torch

        parts, decay = [], []
        for name, p, g in zip(names, params, grads, strict=True):
            parts.append(self._lr_ratio(name) * self._inverse(name, p, g).reshape(-1))
            wd = self._coupled_decay(name)
            decay.append(torch.full((p.numel(),), wd, dtype=torch.float64, device=p.device))
        scale = torch.cat(parts) if parts else None
        shift = torch.cat(decay) if decay else None
        if shift is not None and not bool(shift.any()):
            shift = None
        if scale is not None and not self.preconditioned_kind and bool((scale == 1).all()):
            scale = None
        return scale, shift, self._how()

    def identity(self, names: list[str]) -> bool:
        """diagonal() would find P = I and no coupled weight decay over these
        parameters (an SGD-family step with one learning rate), told without building
        its vectors."""
        return not self.preconditioned_kind and all(
            self._lr_ratio(n) == 1.0 and not self._coupled_decay(n) for n in names
        )

    def _lr_ratio(self, name: str) -> float:
        return (self.lr_of(name) or 0.0) / self.lr if self.lr else 1.0

    def _coupled_decay(self, name: str) -> float:
        """The weight decay added to the gradient (and so to the Hessian's diagonal)."""
        return 0.0 if self.kind in DECOUPLED else self.weight_decay_of(name)

    def _inverse(self, name: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """P^-1 for one parameter (float64, p's shape): the per-coordinate step scale."""
        import torch

        if self.kind in ("adam", "rmsprop") and self.weight_decay_of(name):
            # coupled decay: the optimizer's moments see g + wd * w, as torch's step does
            g = g.to(torch.float64) + self.weight_decay_of(name) * p.detach().to(torch.float64)

        ones = torch.ones(p.shape, dtype=torch.float64, device=p.device)
        if self.kind in ("adam", "adamw"):
            return 1 / self._adam_denominator(name, g)
        if self.kind == "rmsprop":
            return 1 / self._rmsprop_denominator(name, g)
        return ones

    def _how(self) -> str:
        if self.kind in ("adam", "adamw"):
            if self.has_state:
                return (
                    f"P = diag(sqrt(v_hat)+eps), v from the saved exp_avg_sq (step {self.step}) "
                    "and this batch's gradient"
                )
            return (
                "P = diag(sqrt(v_hat)+eps) of Adam's first step (no saved state: v_hat = g^2 "
                "of this batch)"
            )
        if self.kind == "rmsprop":
            src = "the saved square_avg" if self.has_state else "this batch's gradient alone"
            return f"P = diag(sqrt(v)+eps), v from {src}"
        return "P = I (the parameter groups' lr ratios on the diagonal)"


class Stepper:
    """Steps of an optimizer on parameters (the what-if trials): torch.optim's own
    class loaded with the saved state, or LARS/LAMB by their formulas; at rate ``lr``
    (the groups keep their ratios to the first group's lr)."""

    def __init__(self, opt: Optimizer, named: list[tuple[str, torch.Tensor]], lr: float) -> None:
        scale = lr / opt.lr if opt.lr else 1.0
        self.opt = replace(
            opt,
            lr=lr,
            param_lr={n: v * scale for n, v in opt.param_lr.items()},
            state={n: _state_for_torch(st) for n, st in opt.state.items()},
        )
        if opt.members is not None:  # parameters outside the optimizer are not stepped
            named = [(n, p) for n, p in named if n in opt.members]
        self.named = named
        self.torch = None
        cls = self.opt.torch_class()
        if cls is not None:
            groups = [{"params": [p], **self.opt.torch_group(n)} for n, p in named]
            self.torch = cls(groups)
            saved = {i: self.opt.saved_state(n) for i, (n, _) in enumerate(named)}
            if any(saved.values()):
                self.torch.load_state_dict(
                    {
                        "state": {i: st for i, st in saved.items() if st},
                        "param_groups": [
                            {**g, "params": [i]} for i, g in enumerate(self.torch.param_groups)
                        ],
                    }
                )

    def step(self, grads: dict[str, torch.Tensor | None]) -> None:
        """One step from each parameter's gradient (by name)."""
        import torch

        with torch.no_grad():
            if self.torch is not None:
                for n, p in self.named:
                    g = grads.get(n)
                    p.grad = None if g is None else g.detach()
                self.torch.step()
                for _, p in self.named:
                    p.grad = None
                return
            for name, p in self.named:
                g = grads.get(name)
                if g is None:
                    continue
                direction, state = self.opt._layerwise(name, p, g)
                self.opt.state[name] = state
                p.sub_(self.opt.lr_of(name) * direction)


def _step(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)


def _state_for_torch(state: dict[str, Any]) -> dict[str, Any]:
    """A saved per-parameter state as torch.optim's load_state_dict takes it: copies
    (the step works in place), ``step`` a tensor."""
    import torch

    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "step":
            out[key] = torch.tensor(_step(value), dtype=torch.float32)
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
        else:
            out[key] = value
    return out


def _ratio(w: torch.Tensor, d: torch.Tensor, eta: float) -> float:
    wn, dn = float(w.norm()), float(d.norm())
    return eta * wn / dn if wn > 0 and dn > 0 else 1.0


# --- which optimizer ---------------------------------------------------------------


def _from_saved(bound: Any, where: str) -> Optimizer:
    """The optimizer a BoundOptimizer (loading.training_state) describes."""
    h = bound.hyper
    kind = bound.kind
    # the reference rate: the largest group's (a first group at lr 0, a frozen backbone,
    # would make every ratio meaningless)
    lr = max([bound.lr, *bound.param_lr.values()])
    betas = tuple(h.get("betas", (0.9, 0.999)))
    return Optimizer(
        kind=kind,
        lr=lr,
        momentum=float(h.get("momentum", 0.0) or 0.0),
        dampening=float(h.get("dampening", 0.0) or 0.0),
        betas=(float(betas[0]), float(betas[1])),
        eps=float(h.get("eps", 1e-6 if kind == "lamb" else 1e-8)),
        alpha=float(h.get("alpha", 0.99)),
        weight_decay=float(h.get("weight_decay", 0.0) or 0.0),
        centered=bool(h.get("centered", False)),
        amsgrad=bool(h.get("amsgrad", False)),
        trust=float(h.get("trust_coeff", h.get("trust_coefficient", h.get("eta", LARS_ETA)))),
        source=f"read from {where} ({bound.class_guess})",
        lr_source=bound.lr_source,
        state=dict(bound.state),
        param_lr=dict(bound.param_lr),
        param_weight_decay={
            n: float(g.get("weight_decay", 0.0) or 0.0) for n, g in bound.param_hyper.items()
        },
        step=bound.step,
        members=frozenset(bound.param_lr) if bound.param_lr else None,
    )


def resolve(opts: Any, saved: Any = None, where: str = "") -> tuple[Optimizer, list[str]]:
    """The optimizer of a scan: ``opts.optimizer`` and its hyper-parameters over the
    saved one (a BoundOptimizer or None), else plain SGD; and notes on what was taken
    from where."""
    notes: list[str] = list(getattr(saved, "notes", []) or [])
    kind = opts.optimizer
    base: Optimizer | None = None
    if saved is not None and saved.kind is None and kind is None:
        notes.append(
            f"the optimizer saved in {where} is not one nnhealth models ({saved.class_guess}); "
            f"judged as plain SGD: pass {flag('optimizer')} to choose"
        )
    elif saved is not None and saved.kind is not None:
        base = _from_saved(saved, where)
        if kind is not None and _family(kind) != _family(base.kind):
            notes.append(
                f"{flag('optimizer')} {kind} given: the {_NAMES[base.kind]} state saved in "
                f"{where} is not used (its lr still is, unless {flag('lr')} is given)"
            )
            base = replace(base, state={}, step=None)
    if base is None:
        if kind is None:
            kind = "momentum" if opts.momentum else "sgd"
            source = (
                f"{flag('momentum')} {opts.momentum:g} given: SGD with momentum"
                if opts.momentum
                else Optimizer.source
            )
        else:
            source = f"{flag('optimizer')} {kind}"
        base = Optimizer(kind=kind, source=source, eps=1e-6 if kind == "lamb" else 1e-8)
        if kind in ("momentum", "nesterov", "lars") and opts.momentum is None:
            base = replace(base, momentum=0.9)
            notes.append(f"{_NAMES[kind]} without {flag('momentum')}: momentum 0.9 assumed")
    elif kind is not None:
        base = replace(base, kind=kind, source=f"{flag('optimizer')} {kind}; {base.source}")
        if kind in ("momentum", "nesterov", "lars") and not base.momentum and opts.momentum is None:
            base = replace(base, momentum=0.9)
            notes.append(f"{_NAMES[kind]} without {flag('momentum')}: momentum 0.9 assumed")
    return _overridden(base, opts), notes


def _family(kind: str) -> str:
    return {"momentum": "sgd", "nesterov": "sgd", "adamw": "adam", "lamb": "adam"}.get(kind, kind)


def _overridden(base: Optimizer, opts: Any) -> Optimizer:
    """``base`` with the hyper-parameters given as options."""
    changes: dict[str, Any] = {}
    if opts.lr is not None:
        changes["lr"] = opts.lr
        changes["lr_source"] = f"{flag('lr')}"
        if base.param_lr and base.lr:  # keep the groups' ratios to the first group
            changes["param_lr"] = {n: v / base.lr * opts.lr for n, v in base.param_lr.items()}
    if opts.momentum is not None:
        changes["momentum"] = opts.momentum
    if opts.betas is not None:
        changes["betas"] = tuple(opts.betas)
    if opts.eps is not None:
        changes["eps"] = opts.eps
    if opts.weight_decay is not None:
        changes["weight_decay"] = opts.weight_decay
        changes["param_weight_decay"] = {}
    out = replace(base, **changes)
    if out.kind == "nesterov" and out.momentum <= 0:
        raise UsageError(f"{flag('optimizer')} nesterov needs {flag('momentum')} > 0")
    if out.kind == "nesterov" and out.dampening:
        raise UsageError("Nesterov momentum needs zero dampening (as torch.optim.SGD requires)")
    return out


def lr_note(opt: Optimizer) -> str:
    """One line for the report: the optimizer, its lr and why."""
    lr = "no lr" if opt.lr is None else f"lr {opt.lr:g}"
    if opt.lr is not None and opt.lr_source:
        lr += f" from {opt.lr_source}"
    hyper = ""
    if opt.kind in ("adam", "adamw", "lamb"):
        hyper = f", betas ({opt.betas[0]:g}, {opt.betas[1]:g}), eps {opt.eps:g}"
    elif opt.kind == "rmsprop":
        hyper = f", alpha {opt.alpha:g}, eps {opt.eps:g}"
    if opt.weight_decay:
        hyper += f", weight decay {opt.weight_decay:g}"
    state = f"; its saved state at step {opt.step} is used" if opt.has_state else ""
    return f"optimizer: {opt.name}, {lr}{hyper}; {opt.source}{state}"
