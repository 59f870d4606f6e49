"""The optimizer a checkpoint was trained with: its saved state_dict, read safely, and
bound to the model's parameters.

Where it comes from: a Lightning ``.ckpt`` (``optimizer_states``, ``lr_schedulers``), a
``torch.save`` dict holding ``optimizer`` (or ``optimizer_state_dict``, ``optim``) next to
the weights, a Hugging Face Trainer checkpoint folder (``optimizer.pt``,
``scheduler.pt``), or a bare ``optimizer.state_dict()`` file. Every file is loaded with
``weights_only=True`` after the same checks as model files.

The class is inferred from the param-group keys torch.optim writes (the state_dict does
not name it); the per-parameter state is mapped to parameters by the names torch >= 2.6
records (``param_names``), else by position in ``model.parameters()`` order, checked by
shape.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnhealth._util import regular_file
from nnhealth.errors import LoadError, flag
from nnhealth.loading import detect, limits
from nnhealth.loading import model as _model

# Hugging Face Trainer checkpoint folder members
TRAINER_OPTIMIZER = "optimizer.pt"
TRAINER_SCHEDULER = "scheduler.pt"
TRAINER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict")
_WRAPPER_PREFIXES = ("model.", "module.", "net.", "_orig_mod.")
_WHAT_TO_DO = f"save the optimizer created from this model's parameters, or pass {flag('optimizer')} NAME without the state"


@dataclass(frozen=True)
class SavedOptimizer:
    """An optimizer's state_dict as saved ({"state": {int: {...}}, "param_groups": [...]}),
    the lr scheduler's state_dict saved with it (or None), and where they came from."""

    state_dict: dict
    scheduler: dict | None
    where: str  # e.g. "model.ckpt (Lightning optimizer_states[0])", "ckpt-500/optimizer.pt"
    # given on purpose (--optimizer-state, scan(optimizer=...)): a mismatch is refused;
    # found beside the weights, a mismatch is a note and the scan goes on
    explicit: bool = False


@dataclass(frozen=True)
class BoundOptimizer:
    """A saved optimizer read against a model: its class, hyper-parameters, current lr
    and per-parameter state by parameter name."""

    kind: str | None  # sgd momentum nesterov adam adamw rmsprop lars lamb; None: unrecognized
    class_guess: str  # how the class was inferred
    hyper: dict  # the first param group's hyper-parameters, keys as torch names them
    lr: float  # the lr now (after the scheduler)
    lr_source: str
    param_lr: dict[str, float]  # parameter name -> its group's lr
    param_hyper: dict[str, dict]  # parameter name -> its group's hyper-parameters
    state: dict[str, dict[str, Any]]  # parameter name -> its state ("step" as float)
    step: int | None  # the optimizer's step count; None when there is no state
    notes: list[str] = field(default_factory=list)


# --- finding and validating a saved state_dict ----------------------------------------------


def _real(value: Any) -> float | None:
    """A finite real number from a Python number or a one-element tensor, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.is_sparse or value.is_meta:
            return None
        value = value.detach().reshape(()).item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _looks_like_optimizer(obj: Any) -> bool:
    return isinstance(obj, dict) and "param_groups" in obj and "state" in obj


def _validate(sd: dict, where: str) -> None:
    """The structure ``bind`` relies on; one-line LoadError otherwise."""
    bad = f"{where}: a malformed optimizer state_dict"
    groups = sd["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise LoadError(
            f"{bad} (param_groups is not a non-empty list); save optimizer.state_dict()"
        )
    seen: set[int] = set()
    for i, group in enumerate(groups):
        _validate_group(group, f"{bad} (param_groups[{i}]", seen)
    _validate_state(sd["state"], seen, where, bad)


def _validate_group(group: Any, bad: str, seen: set[int]) -> None:
    """One param group; its ids are added to ``seen``."""
    if not isinstance(group, dict) or not all(isinstance(k, str) for k in group):
        raise LoadError(f"{bad} is not a dict); save optimizer.state_dict()")
    ids = group.get("params")
    if not isinstance(ids, list) or not all(type(p) is int for p in ids):
        raise LoadError(f"{bad}.params is not a list of ints)")
    if seen.intersection(ids) or len(set(ids)) != len(ids):
        raise LoadError(f"{bad}: a parameter id appears twice in param_groups)")
    seen.update(ids)
    lr = _real(group.get("lr"))
    if lr is None or lr < 0:
        raise LoadError(f"{bad}.lr is {group.get('lr')!r}, not a number >= 0)")
    names = group.get("param_names")
    if names is not None and (
        not isinstance(names, list)
        or len(names) != len(ids)
        or not all(isinstance(n, str) for n in names)
    ):
        raise LoadError(f"{bad}.param_names does not match its params)")


def _validate_state(state: Any, seen: set[int], where: str, bad: str) -> None:
    """Per-parameter state: id -> dict of tensors and numbers, tensors usable."""
    if not isinstance(state, dict):
        raise LoadError(f"{bad} (state is a {type(state).__name__}, not a dict)")
    tensors: list[tuple[str, torch.Tensor]] = []
    for pid, entry in state.items():
        if type(pid) is not int or pid not in seen:
            raise LoadError(f"{bad} (state key {pid!r} is not a parameter id of its param_groups)")
        if not isinstance(entry, dict) or not all(
            isinstance(v, (torch.Tensor, int, float, type(None))) for v in entry.values()
        ):
            raise LoadError(f"{bad} (state[{pid}] is not a dict of tensors and numbers)")
        tensors += [
            (f"state[{pid}].{k}", v) for k, v in entry.items() if isinstance(v, torch.Tensor)
        ]
    limits.check_usable(tensors, where, LoadError, "optimizer state")
    limits.check_tensors(tensors, where, LoadError, "optimizer state")


def _first_dict(obj: dict, keys: tuple[str, ...]) -> tuple[str, Any] | None:
    for key in keys:
        if key in obj:
            return key, obj[key]
    return None


def _scheduler_of(value: Any) -> dict | None:
    """A scheduler state_dict (a dict with string keys); anything else is no scheduler."""
    if isinstance(value, list) and value:
        value = value[0]
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return value
    return None


def find_saved_optimizer(obj: Any, where: str) -> SavedOptimizer | None:
    """The optimizer state in an already-loaded checkpoint object, or None when there is
    none. A malformed one is a LoadError."""
    if not isinstance(obj, dict):
        return None
    if _looks_like_optimizer(obj):
        _validate(obj, where)
        return SavedOptimizer(obj, None, where)
    states = obj.get("optimizer_states")  # Lightning
    if isinstance(states, list) and states and _looks_like_optimizer(states[0]):
        more = f" of {len(states)}" if len(states) > 1 else ""
        label = f"{where} (Lightning optimizer_states[0]{more})"
        _validate(states[0], label)
        return SavedOptimizer(states[0], _scheduler_of(obj.get("lr_schedulers")), label)
    found = _first_dict(obj, _OPTIMIZER_KEYS)
    if found is None or not _looks_like_optimizer(found[1]):
        return None
    label = f"{where} ({found[0]})"
    _validate(found[1], label)
    sched = _first_dict(obj, _SCHEDULER_KEYS)
    return SavedOptimizer(found[1], _scheduler_of(sched[1]) if sched else None, label)


# --- reading a file or a Trainer folder ----------------------------------------------------


def _load_weights_only(path: Path, what: str) -> Any:
    """torch.load(weights_only=True) after the checks model files get; one-line errors."""
    regular_file(path, what, LoadError)
    kind = _model._sniff(path, str(path), LoadError)
    if kind in (detect.CORRUPT_ZIP, detect.TRUNCATED_ZIP):
        raise LoadError(f"{path}: a truncated or corrupt archive; save the {what} again")
    if kind != detect.TORCH_PICKLE:
        found = detect.DESCRIPTIONS.get(kind, "an unknown format")
        raise LoadError(
            f"{path}: not a torch.save file ({found}); save the {what} with "
            "torch.save(optimizer.state_dict(), FILE)"
        )
    hint = "save the optimizer's state_dict (optimizer.state_dict()) with torch.save"
    limits.torch_pickles(path, str(path), LoadError, trusted=False, hint=hint)
    try:
        with limits.quiet_readers():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoadError(
            f"{path}: holds more than tensors and numbers ({_model._unpickler_reason(exc)}); {hint}"
        ) from exc
    except (Exception, SystemExit) as exc:  # torch.load on a damaged file raises anything
        raise _model._unreadable(path, exc) from exc


def trainer_folder(path: Path) -> bool:
    """A Hugging Face Trainer checkpoint folder (or save_pretrained folder)."""
    return path.is_dir() and any(
        (path / name).is_file() for name in (*TRAINER_WEIGHTS, TRAINER_OPTIMIZER)
    )


def _read_trainer_folder(path: Path) -> SavedOptimizer:
    opt_file = path / TRAINER_OPTIMIZER
    if not opt_file.exists():
        raise LoadError(
            f"{path}: a directory without {TRAINER_OPTIMIZER} (a Hugging Face Trainer checkpoint "
            "folder holds one); give the file that holds the optimizer's state_dict"
        )
    obj = _load_weights_only(opt_file, "optimizer state")
    if not _looks_like_optimizer(obj):
        raise LoadError(f"{opt_file}: holds no optimizer state_dict; save optimizer.state_dict()")
    _validate(obj, str(opt_file))
    scheduler = None
    sched_file = path / TRAINER_SCHEDULER
    if sched_file.exists():
        scheduler = _scheduler_of(_load_weights_only(sched_file, "scheduler state"))
        if scheduler is None:
            raise LoadError(
                f"{sched_file}: holds no scheduler state_dict; save scheduler.state_dict()"
            )
    return SavedOptimizer(obj, scheduler, str(opt_file))


def read_optimizer_state(path: Path) -> SavedOptimizer:
    """The optimizer state in FILE (a bare state_dict or any checkpoint
    ``find_saved_optimizer`` reads) or in a Hugging Face Trainer checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such optimizer state file")
    if path.is_dir():
        return _read_trainer_folder(path)
    obj = _load_weights_only(path, "optimizer state")
    saved = find_saved_optimizer(obj, str(path))
    if saved is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise LoadError(
            f"{path}: no optimizer state in it (found {keys}); save optimizer.state_dict(), or "
            "a checkpoint dict holding it under 'optimizer'"
        )
    return saved


# --- the optimizer class from its param-group keys ---------------------------------------------

# keys torch.optim writes; "required" tell the class apart, the rest may be missing in
# other torch versions
_SGD = (
    {"lr", "momentum", "dampening", "nesterov", "weight_decay"},
    {"maximize", "foreach", "differentiable", "fused"},
)
_ADAM = (
    {"lr", "betas", "eps", "weight_decay", "amsgrad"},
    {"maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"},
)
_RMSPROP = (
    {"lr", "alpha", "eps", "weight_decay", "momentum", "centered"},
    {"maximize", "foreach", "capturable", "differentiable"},
)
# group keys that schedulers, torch and training libraries add (not hyper-parameters of a class)
_BENIGN = {
    "params",
    "param_names",
    "initial_lr",
    "max_lr",
    "min_lr",
    "base_lr",
    "base_momentum",
    "max_momentum",
    "lr_scale",
}


def _extra_keys(group: dict, known: tuple[set[str], set[str]]) -> list[str]:
    """Keys beyond the class's own: a label (a str value, e.g. "name") is fine."""
    required, optional = known
    return sorted(
        k for k in group if k not in required | optional | _BENIGN and not isinstance(group[k], str)
    )


def _exact(group: dict, known: tuple[set[str], set[str]]) -> bool:
    return known[0] <= group.keys() and not _extra_keys(group, known)


def _sgd_kind(group: dict) -> str:
    if group.get("nesterov"):
        return "nesterov"
    return "momentum" if (_real(group.get("momentum")) or 0) > 0 else "sgd"


def _adam_kind(group: dict) -> tuple[str, str]:
    keys = "param-group keys betas, eps, amsgrad"
    if "decoupled_weight_decay" in group:
        decoupled = bool(group["decoupled_weight_decay"])
        name = "AdamW" if decoupled else "Adam"
        return name.lower(), f"{keys}, decoupled_weight_decay={decoupled}: {name}"
    # torch < 2.6 writes the same keys for Adam and AdamW: with no weight decay they step
    # alike; with weight decay, AdamW is the usual choice
    wd = _real(group.get("weight_decay")) or 0.0
    if wd == 0:
        return (
            "adam",
            f"{keys}, no decoupled_weight_decay key, weight_decay 0: Adam (AdamW steps alike)",
        )
    return "adamw", (
        f"{keys}, no decoupled_weight_decay key, weight_decay {wd:g}: guessed AdamW "
        "(Adam saves the same keys)"
    )


def _lars_lamb(group: dict) -> tuple[str, str] | None:
    keys = group.keys()
    if "momentum" in keys and keys & {"trust_coeff", "trust_coefficient", "eta"}:
        found = sorted(keys & {"trust_coeff", "trust_clip", "trust_coefficient", "eta"})
        return "lars", f"param-group keys momentum, {', '.join(found)}: LARS-like"
    if "betas" in keys and "grad_averaging" in keys and keys & {"max_grad_norm", "trust_clip"}:
        found = sorted(keys & {"grad_averaging", "max_grad_norm", "trust_clip"})
        return "lamb", f"param-group keys betas, {', '.join(found)}: LAMB-like (timm Lamb)"
    if "betas" in keys and "clamp_value" in keys and keys & {"adam", "debias"}:
        found = sorted(keys & {"clamp_value", "adam", "debias"})
        return (
            "lamb",
            f"param-group keys betas, {', '.join(found)}: LAMB-like (torch-optimizer Lamb)",
        )
    return None


def classify(group: dict) -> tuple[str | None, str]:
    """(kind, how it was inferred) from one param group's keys."""
    found = _lars_lamb(group)
    if found is not None:
        return found
    if _exact(group, _SGD):
        kind = _sgd_kind(group)
        return kind, f"param-group keys momentum, dampening, nesterov: SGD ({kind})"
    if _exact(group, _ADAM):
        return _adam_kind(group)
    if _exact(group, _RMSPROP):
        return "rmsprop", "param-group keys alpha, centered: RMSprop"
    keys = ", ".join(sorted(k for k in group if k not in ("params", "param_names")))
    return None, f"param-group keys {keys}: not an optimizer nnhealth models"


# --- the lr after the scheduler ------------------------------------------------------------------

_SCHEDULERS = (  # keys that tell torch's schedulers apart (their state_dict has no class name)
    ("SequentialLR", {"_schedulers", "_milestones"}),
    ("ChainedScheduler", {"_schedulers"}),
    ("OneCycleLR", {"total_steps", "anneal_func"}),
    ("OneCycleLR", {"total_steps", "_anneal_func_type"}),
    ("CyclicLR", {"max_lrs", "step_size_up"}),
    ("CyclicLR", {"max_lrs", "total_size"}),
    ("CosineAnnealingWarmRestarts", {"T_0", "T_mult"}),
    ("CosineAnnealingLR", {"T_max", "eta_min"}),
    ("ReduceLROnPlateau", {"patience", "cooldown"}),
    ("PolynomialLR", {"total_iters", "power"}),
    ("LinearLR", {"start_factor", "end_factor"}),
    ("ConstantLR", {"factor", "total_iters"}),
    ("MultiStepLR", {"milestones", "gamma"}),
    ("StepLR", {"step_size", "gamma"}),
    ("LambdaLR", {"lr_lambdas"}),
    ("ExponentialLR", {"gamma"}),
)


def scheduler_name(scheduler: dict) -> str:
    """torch's scheduler class whose state_dict has these keys, or "a scheduler"."""
    for name, keys in _SCHEDULERS:
        if keys <= scheduler.keys():
            return name
    return "a scheduler"


def _group_lrs(saved: SavedOptimizer, notes: list[str]) -> tuple[list[float], str]:
    """Each group's lr now, and where the first came from: the groups' "lr" (schedulers
    write it in place), cross-checked with the scheduler's ``_last_lr``; when they differ,
    ``_last_lr`` wins."""
    lrs = [_real(g["lr"]) for g in saved.state_dict["param_groups"]]
    sched = saved.scheduler
    if sched is None:
        return lrs, "param group (no scheduler state saved)"
    name = scheduler_name(sched)
    last = sched.get("_last_lr")
    last = [_real(v) for v in last] if isinstance(last, list) else []
    if not last or None in last or len(last) != len(lrs):
        return lrs, f"param group (after the scheduler: {name}, no usable _last_lr saved)"
    if all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(last, lrs, strict=True)):
        return lrs, f"param group (after the scheduler: {name}, _last_lr {last[0]:.3g})"
    notes.append(
        f"the param group's lr {lrs[0]:.3g} differs from the scheduler's _last_lr "
        f"{last[0]:.3g} ({name}); using _last_lr"
    )
    return last, f"scheduler _last_lr ({name}; the param group says {lrs[0]:.3g})"


# --- mapping the state to the model's parameters ---------------------------------------------

# state entries shaped like their parameter (torch.optim's, timm's Lars and Lamb)
_SHAPED = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "grad_avg",
    "sum",
    "acc_delta",
    "exp_inf",
    "prev",
    "ax",
)


def _hf_decay_rule(model: nn.Module, patterns: tuple[str, ...]) -> set[str]:
    """Names of the parameters Hugging Face Trainer decays: not inside a LayerNorm, and
    whose lower-cased name matches none of ``patterns`` (its get_decay_parameter_names)."""
    compiled = [re.compile(p) for p in patterns]
    decay = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if not any(c.search(full.lower()) for c in compiled):
                decay.add(full)
    inside_norm = {
        f"{m}.{n}" if m else n
        for m, mod in model.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for n, _ in mod.named_parameters()
    }
    return decay - inside_norm


_HF_PATTERNS = (
    (
        "bias",
        "layernorm",
        "rmsnorm",
        r"(?:^|\.)norm(?:$|\.)",
        r"_norm(?:$|\.)",
    ),  # transformers >= 4.47
    ("bias",),  # older releases
)


def _candidates(model: nn.Module, ngroups: int) -> list[tuple[str, list[str]]]:
    """Parameter-name orders the optimizer may have been built with, most likely first."""
    named = list(model.named_parameters())
    trainable = [n for n, p in named if p.requires_grad]
    found = [
        ("model.parameters() order, trainable only", trainable),
        ("model.parameters() order", [n for n, _ in named]),
    ]
    if ngroups > 1:
        for patterns in _HF_PATTERNS:
            decay = _hf_decay_rule(model, patterns)
            split = [n for n in trainable if n in decay] + [n for n in trainable if n not in decay]
            found.append(("Hugging Face Trainer groups (decay, then no-decay)", split))
        params = dict(named)
        matrices = [n for n in trainable if params[n].ndim > 1]
        vectors = [n for n in trainable if params[n].ndim <= 1]
        found.append(("groups of matrices, then biases and norm weights", matrices + vectors))
        found.append(
            ("groups of biases and norm weights, then matrices (timm)", vectors + matrices)
        )
    return found


def _mismatch(order: list[str], ids: list[int], sd: dict, params: dict) -> str | None:
    """The first state tensor whose shape differs from its parameter's, or None."""
    for name, pid in zip(order, ids, strict=True):
        for key in _SHAPED:
            t = sd["state"].get(pid, {}).get(key)
            if isinstance(t, torch.Tensor) and t.shape != params[name].shape:
                return (
                    f"state {pid} ({key}) has shape {tuple(t.shape)}, parameter {name} "
                    f"{tuple(params[name].shape)}"
                )
    return None


def _has_shaped(state: dict) -> bool:
    return any(isinstance(e.get(k), torch.Tensor) for e in state.values() for k in _SHAPED)


def _named_order(sd: dict, params: dict) -> tuple[str, list[str]] | None:
    """The order given by ``param_names`` (torch >= 2.6), with a wrapper prefix removed."""
    groups = sd["param_groups"]
    if not all("param_names" in g for g in groups):
        return None
    names = [n for g in groups for n in g["param_names"]]
    for prefix in ("", *_WRAPPER_PREFIXES):
        if all(n.startswith(prefix) and n[len(prefix) :] in params for n in names):
            return "param_names saved by the optimizer", [n[len(prefix) :] for n in names]
    return None


def _map_params(saved: SavedOptimizer, model: nn.Module, notes: list[str]) -> list[str]:
    """Parameter names, one per id in param-group order; LoadError when none fits."""
    sd = saved.state_dict
    ids = [p for g in sd["param_groups"] for p in g["params"]]
    params = dict(model.named_parameters())
    named = _named_order(sd, params)
    cands = [named] if named else _candidates(model, len(sd["param_groups"]))
    first_miss = None
    for label, order in cands:
        if len(order) != len(ids):
            continue
        miss = _mismatch(order, ids, sd, params)
        if miss is None:
            if label != "model.parameters() order, trainable only" or len(params) != len(order):
                notes.append(f"optimizer state mapped to parameters by {label}")
            if not _has_shaped(sd["state"]):
                notes.append("no per-parameter state to check the mapping by shape")
            return order
        first_miss = first_miss or miss
    trainable = sum(p.requires_grad for p in params.values())
    detail = f"; first mismatch: {first_miss}" if first_miss else ""
    raise LoadError(
        f"{saved.where}: the optimizer state does not fit the model: it holds {len(ids)} "
        f"parameters, the model {len(params)} ({trainable} trainable){detail}; {_WHAT_TO_DO}"
    )


# --- binding ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """0-dim tensors (and tuples of them) as Python floats; the rest unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _real(value)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _hyper(group: dict) -> dict:
    return {k: _plain(v) for k, v in group.items() if k not in ("params", "param_names")}


def _param_state(entry: dict) -> dict[str, Any]:
    return {k: (_real(v) if k == "step" else v) for k, v in entry.items()}


def bind(saved: SavedOptimizer, model: nn.Module) -> BoundOptimizer:
    """The saved optimizer read against ``model``'s parameters. Reads only: neither the
    model nor the saved tensors change."""
    sd = saved.state_dict
    groups = sd["param_groups"]
    notes: list[str] = []
    kind, guess = classify(groups[0])
    others = {str(classify(g)[0]) for g in groups[1:]} - {str(kind)}
    if others:
        notes.append(
            f"param groups look like different optimizers ({guess}; also {', '.join(sorted(others))})"
        )
    lrs, lr_source = _group_lrs(saved, notes)
    order = _map_params(saved, model, notes)
    owner = [i for i, g in enumerate(groups) for _ in g["params"]]
    ids = [p for g in groups for p in g["params"]]
    hypers = [_hyper(g) for g in groups]
    state = {
        n: _param_state(sd["state"][pid])
        for n, pid in zip(order, ids, strict=True)
        if pid in sd["state"]
    }
    steps = [s["step"] for s in state.values() if s.get("step") is not None]
    if len(groups) > 1:
        notes.append(f"{len(groups)} param groups; hyper-parameters from the first")
    return BoundOptimizer(
        kind=kind,
        class_guess=guess,
        hyper=hypers[0],
        lr=lrs[0],
        lr_source=lr_source,
        param_lr={n: lrs[g] for n, g in zip(order, owner, strict=True)},
        param_hyper={n: hypers[g] for n, g in zip(order, owner, strict=True)},
        state=state,
        step=int(max(steps)) if steps else None,
        notes=notes,
    )


__all__: list[str] = [
    "BoundOptimizer",
    "SavedOptimizer",
    "bind",
    "classify",
    "find_saved_optimizer",
    "read_optimizer_state",
    "scheduler_name",
    "trainer_folder",
]
