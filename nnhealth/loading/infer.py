"""The input a model takes, read from its first layer: the batch ``nnhealth scan
model.pt`` builds when given none, and what tells a forgotten batch dimension in
``--input-shape``.

The first layer is the first to receive the input. It is found by running a copy of
the model whose parameters and buffers live on the meta device (shapes only: no memory,
no arithmetic) with a forward pre-hook on every layer; the user's model is neither
run nor touched. When that copy cannot run, the first layer in registration order.

Defaults (each stated in the report when used):
- ``EXAMPLES`` examples (16: an MLP's), fewer (at least ``MIN_EXAMPLES``) when the batch
  would hold more than ``VALUES_BUDGET`` input values: 8 at 3x64x64, 2 at 3x224x224
  (a conv layer's positions multiply the values each unit is judged on);
- ``SPATIAL`` per spatial dimension of a ConvNd or BatchNormNd: 64 for 2d (ResNet's
  stride-32 downsampling leaves 2x2), 256 for 1d, 16 for 3d; an ``image_size`` /
  ``img_size`` attribute (torchvision/timm ViT, a Hugging Face config) wins; a model
  that does not run at the default (a flatten into a fixed Linear) gets the first of
  ``SIZES`` it runs at;
- ``TOKENS`` token ids per example, at most the model's ``n_positions`` /
  ``max_position_embeddings``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.lazy import LazyModuleMixin

EXAMPLES = 16  # dead-relu judges a unit on at least 16 values: an MLP's examples
MIN_EXAMPLES = 2  # BatchNorm in train mode needs two values per channel
VALUES_BUDGET = 8 * 3 * 64 * 64  # input values per batch before examples are cut
SPATIAL = {1: 256, 2: 64, 3: 16}
# sizes tried when the default does not run (a flatten into a fixed Linear: one of them
# runs; a minimum size such as Inception's 75: the smallest that runs), ascending
SIZES = {
    1: (256, 16, 32, 64, 128, 512, 1024, 16000),
    2: (64, 16, 28, 32, 96, 128, 224, 256, 299),
    3: (16, 8, 32, 64, 112),
}
TOKENS = 32
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len")
IMAGE_KEYS = ("image_size", "img_size")
MAX_TRIES = 8  # layers tried as the first one (each a few meta forwards)
_PROBE = "found by a forward pre-hook on a meta-device copy of the model"


@dataclass
class InputLayer:
    """The first layer and the input one example of it takes (``shape`` None: cannot be
    built, ``why`` says so)."""

    name: str
    module: nn.Module | None
    shape: tuple[int, ...] | None
    fixed: dict[int, int] = field(default_factory=dict)  # per-example dims the layer fixes
    ids_below: int | None = None  # token ids in [0, ids_below) instead of floats
    spatial_dims: int = 0
    defaults: str = ""
    how: str = _PROBE
    why: str = ""

    @property
    def examples(self) -> int:
        return examples_for(self.shape or ())

    def one_example(self, shape: tuple[int, ...]) -> bool:
        """``shape`` is one example of this layer's float input (no batch dimension)."""
        return (
            self.shape is not None
            and self.ids_below is None
            and bool(self.fixed)
            and len(shape) == len(self.shape)
            and all(shape[i] == size for i, size in self.fixed.items())
        )

    @property
    def label(self) -> str:
        return self.name or "(root)"

    def describe(self) -> str:
        return describe(self.module) if self.module is not None else "?"


def examples_for(shape: tuple[int, ...]) -> int:
    return max(MIN_EXAMPLES, min(EXAMPLES, VALUES_BUDGET // max(1, math.prod(shape))))


def describe(module: nn.Module) -> str:
    """``Conv2d(3, 64, …)``: the class and its first two constructor arguments."""
    parts = [p.strip() for p in module.extra_repr().split(",") if p.strip()]
    shown = [p.split("=", 1)[-1] for p in parts[:2]]
    return f"{type(module).__name__}({', '.join(shown)}{', …' if len(parts) > 2 else ''})"


def _config_values(model: nn.Module, keys: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(key, value) for each of ``keys`` set on a module or its ``config`` (Hugging Face)."""
    found = []
    for module in model.modules():
        for owner in (module, getattr(module, "config", None)):
            for key in keys:
                value = getattr(owner, key, None) if owner is not None else None
                if value is not None and not callable(value):
                    found.append((key, value))
    return found


def _positions(model: nn.Module) -> tuple[int, str]:
    """Tokens per example and why: TOKENS, within the model's position limit."""
    limits = [(k, v) for k, v in _config_values(model, POSITION_KEYS) if isinstance(v, int)]
    if not limits:
        return TOKENS, f"{TOKENS} tokens (nnhealth's default length)"
    key, most = min(limits, key=lambda kv: kv[1])
    if most < TOKENS:
        return most, f"{most} tokens ({key}={most})"
    return TOKENS, f"{TOKENS} tokens (nnhealth's default length, within {key}={most})"


def _image_size(model: nn.Module, dims: int) -> tuple[tuple[int, ...], str] | None:
    """A fixed input size the model declares (``image_size`` / ``img_size``)."""
    for key, value in _config_values(model, IMAGE_KEYS):
        if isinstance(value, int) and value > 0:
            return (value,) * dims, key
        if (
            isinstance(value, (tuple, list))
            and len(value) == dims
            and all(isinstance(v, int) and v > 0 for v in value)
        ):
            return tuple(value), key
    return None


def _spatial(module: nn.Module) -> int:
    """Spatial dims of the input: a ConvNd's N, BatchNorm2d/3d's 2/3 (BatchNorm1d: [N, C])."""
    if isinstance(module, _ConvNd):
        return len(module.kernel_size)
    return {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(module), 0)


def _spec(module: nn.Module, spatial: tuple[int, ...], tokens: int) -> InputLayer | str:
    """The input one example of ``module`` takes, or why nnhealth cannot build it."""
    kind = type(module).__name__
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return f"{kind} is lazy (its input size is set by the first batch)"
    if isinstance(module, nn.Linear):
        return InputLayer("", module, (module.in_features,), {0: module.in_features})
    if isinstance(module, _ConvNd) or _spatial(module):
        channels = module.in_channels if isinstance(module, _ConvNd) else module.num_features
        return InputLayer(
            "", module, (channels, *spatial), {0: channels}, spatial_dims=len(spatial)
        )
    if isinstance(module, nn.BatchNorm1d):
        return InputLayer("", module, (module.num_features,), {0: module.num_features})
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return InputLayer("", module, (tokens,), ids_below=module.num_embeddings)
    if isinstance(module, nn.RNNBase):
        if not module.batch_first:
            return f"{kind} takes [time, batch, features] (batch_first=False)"
        return InputLayer("", module, (tokens, module.input_size), {1: module.input_size})
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        return InputLayer("", module, shape, dict(enumerate(shape)))
    return f"{kind} takes an input nnhealth cannot guess"


def _layers(model: nn.Module) -> list[str]:
    """Names of the modules that compute with their own parameters, in registration
    order: leaves, and any layer whose input nnhealth can build (the root included when
    it is one, e.g. a bare nn.Linear)."""
    out = []
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        leaf = next(module.children(), None) is None
        if leaf or not isinstance(_spec(module, (1,), 1), str):
            out.append(name)
    return out


@dataclass(frozen=True)
class _Declared:
    """What the model declares about its input: tokens per example (and why), and a
    fixed image size per number of spatial dims."""

    tokens: int
    token_text: str
    images: dict[int, tuple[tuple[int, ...], str] | None]

    @classmethod
    def of(cls, model: nn.Module) -> _Declared:
        tokens, text = _positions(model)
        return cls(tokens, text, {d: _image_size(model, d) for d in SPATIAL})


def _candidates(declared: _Declared, name: str, module: nn.Module) -> list[InputLayer]:
    """The inputs to try for ``module`` as the first layer, the likeliest first; each
    with ``defaults`` saying where its sizes come from."""
    tokens, token_text = declared.tokens, declared.token_text
    dims = _spatial(module)
    sizes: list[tuple[tuple[int, ...], str]] = []
    if dims:
        known = declared.images.get(dims)
        if known is not None:
            sizes.append((known[0], f"{'x'.join(map(str, known[0]))} from the model's {known[1]}"))
        default = SPATIAL[dims]
        sizes.append(((default,) * dims, f"{default} per spatial dim (nnhealth's default)"))
        tried = ", ".join(map(str, SIZES[dims]))
        for s in SIZES[dims]:
            text = f"{s} per spatial dim (the first of {tried} the model runs at)"
            sizes.append(((s,) * dims, text))
    else:
        sizes.append(((), ""))
    out, seen = [], set()
    for spatial, text in sizes:
        spec = _spec(module, spatial, tokens)
        if isinstance(spec, str) or spatial in seen:
            continue
        seen.add(spatial)
        bits = [f"{examples_for(spec.shape)} examples", text]
        if spec.ids_below is not None:
            bits.append(token_text)
        out.append(replace(spec, name=name, defaults=", ".join(b for b in bits if b)))
    return out


def _meta_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy whose parameters and buffers are empty meta tensors (ties kept), or
    None when the model cannot be copied so."""
    memo: dict[int, Any] = {}
    try:
        for t in chain(model.parameters(), model.buffers()):
            if id(t) not in memo:
                meta = torch.empty_like(t, device="meta")
                if isinstance(t, nn.Parameter):
                    meta = nn.Parameter(meta, requires_grad=t.requires_grad)
                memo[id(t)] = meta
        copied = copy.deepcopy(model, memo)
    except Exception:  # noqa: BLE001 (parametrized, lazy, exotic tensors: no probe)
        return None
    for module in copied.modules():  # the user's hooks (shared functions) must not see it
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            getattr(module, "_forward_hooks_with_kwargs", {}),
            getattr(module, "_forward_pre_hooks_with_kwargs", {}),
            getattr(module, "_forward_hooks_always_called", {}),
        ):
            hooks.clear()
    return copied


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _probe(
    meta: nn.Module, hooked: dict[str, nn.Module], layer: InputLayer
) -> tuple[str | None, bool]:
    """Run ``meta`` on a meta batch of ``layer``'s input: the first hooked layer the
    input reached, and whether the forward ran to its end."""
    dtype = torch.int64 if layer.ids_below is not None else _float_dtype(meta)
    x = torch.empty((layer.examples, *layer.shape), dtype=dtype, device="meta")
    first: list[str] = []

    def pre_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not first:
                first.append(name)

        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in hooked.items()]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta(x)
        ran = True
    except Exception:  # noqa: BLE001 (a wrong shape, or an op meta tensors lack)
        ran = False
    finally:
        for h in handles:
            h.remove()
    return (first[0] if first else None), ran


@dataclass
class _Search:
    model: nn.Module
    meta: nn.Module
    names: list[str]
    declared: _Declared
    reached: InputLayer | None = None  # the first layer reached, the forward not finished

    def run(self) -> InputLayer | None:
        modules = dict(self.model.named_modules())
        hooked = {n: m for n, m in self.meta.named_modules() if n in set(self.names)}
        queue = [n for n in self.names if not isinstance(_spec(modules[n], (1,), 1), str)]
        queue, tried = queue[:MAX_TRIES], set()
        while queue:
            name = queue.pop(0)
            if name in tried:
                continue
            tried.add(name)
            for layer in _candidates(self.declared, name, modules[name]):
                first, ran = _probe(self.meta, hooked, layer)
                if first == name and ran:
                    return layer
                if first == name:
                    self.reached = self.reached or layer
                elif first is not None:  # the input reached another layer first
                    why = _spec(modules[first], (1,), 1)
                    if isinstance(why, str):
                        return InputLayer(first, modules[first], None, why=_first_is(first, why))
                    queue.insert(0, first)
                    break
        return None


def _first_is(name: str, why: str) -> str:
    return f"the first layer to receive the input is {name or '(root)'}: {why}"


def _registration(
    model: nn.Module, names: list[str], declared: _Declared, reason: str
) -> InputLayer:
    """The first layer in registration order, when the meta copy could not tell."""
    modules = dict(model.named_modules())
    name = names[0]
    found = _candidates(declared, name, modules[name])
    if not found:
        why = _spec(modules[name], (1,), 1)
        return InputLayer(
            name, modules[name], None, why=f"its first layer, {name or '(root)'}: {why} ({reason})"
        )
    return replace(found[0], how=f"the first in registration order: {reason}")


def input_layer(model: nn.Module, shape: tuple[int, ...] | None = None) -> InputLayer:
    """The first layer to receive the input and the input one example of it takes.
    With ``shape`` (a user's --input-shape), the meta probe runs only when some layer
    could take ``shape`` as one example; otherwise registration order answers."""
    if isinstance(model, torch.jit.ScriptModule):
        return InputLayer("", None, None, why="a TorchScript model has no layers to read it from")
    names = _layers(model)
    if not names:
        return InputLayer("", None, None, why="the model has no layer with parameters")
    modules = dict(model.named_modules())
    declared = _Declared.of(model)
    if shape is not None and not any(
        c.one_example(shape) for n in names for c in _candidates(declared, n, modules[n])[:1]
    ):
        return _registration(model, names, declared, "no layer takes this shape as one example")
    meta = _meta_copy(model)
    if meta is None:
        reason = "the model could not be copied to the meta device"
        return _registration(model, names, declared, reason)
    search = _Search(model, meta, names, declared)
    found = search.run()
    if found is not None:
        return found
    if search.reached is not None:
        return replace(
            search.reached,
            how=f"{_PROBE}, which did not run to its end at any size tried: unverified",
        )
    return _registration(model, names, declared, "the model did not run on a meta-device copy")
