"""Per-parameter norms (and their gradients'), and the weight-only capture."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from nnhealth.capture.precision import dtype_name, nonfinite_count, norm64, readable
from nnhealth.capture.stats import Capture, ParamStats
from nnhealth.capture.structure import is_norm

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# (name, parameter, gradient) -> the change one optimizer step makes (None: none)
Update = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def is_layer_weight(pname: str, ndim: int) -> bool:
    """A layer's weight matrix or filters: ``weight`` of Linear/Conv/Embedding (and
    HF's Conv1D), ``weight_ih_l0``/``in_proj_weight`` of recurrent and attention
    modules. Not a free tensor of two or more dimensions (a class token, positional
    embeddings, a ConvNeXt ``layer_scale`` or ``gamma`` of shape [C, 1, 1])."""
    return ndim >= 2 and "weight" in pname


def param_role(module: nn.Module | None, pname: str, p: torch.Tensor) -> str:
    if module is not None and is_norm(module):
        return "norm"
    if pname.endswith("bias"):
        return "bias"
    if is_layer_weight(pname, p.ndim):
        return "weight"
    if type(module).__name__ == "ParametrizationList" and p.ndim >= 2:
        return "weight"  # parametrizations.weight.original (weight_norm, spectral_norm)
    return "other"


def _sparse_rows(module_kind: str, role: str, g: torch.Tensor) -> bool:
    """An embedding table whose gradient leaves rows at exactly 0 (tokens absent from
    the batch): ||w|| / ||grad w|| over the whole table is not a layer's ratio."""
    if role != "weight" or module_kind not in {t.__name__ for t in _EMBEDDINGS}:
        return False
    if g.layout != torch.strided:
        return True  # nn.Embedding(sparse=True): only the rows in the batch
    # a row of zeros: its max and min are 0 (NaN is neither); two reductions, no mask
    # the size of the table
    rows = g.reshape(g.shape[0], -1)
    return bool(((rows.amax(dim=1) == 0) & (rows.amin(dim=1) == 0)).any())


def param_stats(
    named: list[tuple[str, torch.Tensor]],
    owners: dict[str, tuple[str, str, str]],
    grads: dict[str, torch.Tensor | None] | None,
    update: Update | None = None,
) -> tuple[ParamStats, ...]:
    """Norms of each parameter (float64) and of its gradient when ``grads`` has it;
    with ``update(name, p, grad)`` (the optimizer's step), the norm of that step."""
    out = []
    with torch.no_grad():
        for name, p in named:
            t = p.detach()
            norm = norm64(t)  # float64 whatever the dtype (float8 has no such reduction)
            nonfinite = 0 if math.isfinite(norm) else nonfinite_count(t)
            module, kind, role = owners[name]
            gnorm, gbad, unorm = None, 0, None
            g = grads.get(name) if grads is not None else None
            if g is not None:
                gnorm = norm64(g)
                unorm = _update_norm(update, name, p, g)
                if not math.isfinite(gnorm):
                    gbad = nonfinite_count(g)
                if _sparse_rows(kind, role, g):
                    role = "embedding"
            elif grads is not None and p.requires_grad:
                gnorm = 0.0  # trainable but unused by this loss: its gradient is zero
            out.append(
                ParamStats(
                    name=name,
                    module=module,
                    kind=kind,
                    role=role,
                    shape=tuple(t.shape),
                    trainable=bool(p.requires_grad),
                    norm=norm,
                    nonfinite=nonfinite,
                    grad_norm=gnorm,
                    grad_nonfinite=gbad,
                    update_norm=unorm,
                )
            )
    return tuple(out)


def _update_norm(
    update: Update | None, name: str, p: torch.Tensor, g: torch.Tensor
) -> float | None:
    """||the optimizer's step|| for ``p`` (None: no optimizer step to take, or a sparse
    or non-finite gradient that it would not take as such)."""
    if update is None or g.layout != torch.strided or not bool(torch.isfinite(g).all()):
        return None
    step = update(name, p, g)
    return None if step is None else norm64(step)


def module_owners(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    owners = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            owners[full] = (mname, type(module).__name__, param_role(module, pname, p))
    return owners


def capture_weights(
    state: dict[str, torch.Tensor],
    owners_hint: dict[str, str],
    modules: dict[str, tuple[str, str, str]] | None = None,
) -> Capture:
    """Weight-only capture (no pass): of a bare state_dict, or of a model's parameters
    with ``modules`` (module_owners: each parameter's module, its type and role)."""
    floats = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    floats = [(k, v) for k, v in floats if v.is_floating_point()]
    named = [(k, v) for k, v in floats if readable(v)]
    packed = sorted({dtype_name(v.dtype) for _, v in floats if not readable(v)})
    notes = ()
    if packed:
        skipped = len(floats) - len(named)
        note = (
            f"{skipped} tensor(s) in {', '.join(packed)} skipped: packed sub-byte floats "
            "cannot be read element by element"
        )
        notes = (note,)
    owners = {}
    for name, t in named:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        pname = name.rsplit(".", 1)[-1]
        kind = owners_hint.get(module, "?")
        role = (
            "bias" if pname == "bias" else ("weight" if is_layer_weight(pname, t.ndim) else "other")
        )
        owners[name] = (modules or {}).get(name, (module, kind, role))
    return Capture(
        sites=(),
        params=param_stats(named, owners, None),
        has_activations=False,
        has_gradients=False,
        loss=None,
        mode=None,
        examples=None,
        notes=notes,
        has_modules=modules is not None,
        missing_reason=(
            "bare state_dict: there is no architecture to run; give one with --arch "
            "pkg.module:factory (or scan the entry point with --weights FILE)"
        ),
    )
