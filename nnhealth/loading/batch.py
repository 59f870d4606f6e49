"""Resolve the batch: a file (.pt, .npz, .npy: never unpickling code), a synthetic
unit-Gaussian batch of a given shape, or the example a factory returned."""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnhealth._util import tensors_in
from nnhealth.errors import DataError, UsageError
from nnhealth.loading import detect

_MAX_SYNTHETIC = 2**31 - 1  # values in a synthetic batch (8 GiB of float32)
INPUT_KEYS = ("inputs", "input", "x", "data", "images", "features", "arr_0")
TARGET_KEYS = ("targets", "target", "labels", "label", "y", "arr_1")


@dataclass
class Batch:
    inputs: Any  # a tensor, a tuple of tensors (positional) or a dict (keyword arguments)
    targets: torch.Tensor | None
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> torch.Tensor:
        return tensors_in(self.inputs)[0]

    @property
    def examples(self) -> int:
        t = self.primary
        return int(t.shape[0]) if t.ndim else 1

    @property
    def shape(self) -> list[int]:
        return list(self.primary.shape)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": self.shape,
            "targets_shape": None if self.targets is None else list(self.targets.shape),
        }


def parse_shape(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+(\s*[x,]\s*\d+)*\s*", text or ""):
        raise UsageError(
            f"--input-shape {text!r}: expected sizes joined by x, batch first, e.g. 64x3x32x32"
        )
    dims = tuple(int(d) for d in re.split(r"[x,]", text.replace(" ", "")))
    if any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: every size must be positive")
    return dims


def synthetic(shape: tuple[int, ...], seed: int, model: nn.Module | None) -> Batch:
    """Unit-Gaussian inputs from a seeded generator (integer ids for an Embedding model)."""
    gen = torch.Generator().manual_seed(seed)
    values = math.prod(shape)
    if values > _MAX_SYNTHETIC:
        raise UsageError(
            f"--input-shape {'x'.join(map(str, shape))}: {values:.3g} values is more than this "
            f"tool will allocate ({_MAX_SYNTHETIC:.0e}); use a smaller batch"
        )
    first = None
    if model is not None:
        first = next(
            (m for m in model.modules() if next(m.parameters(False), None) is not None), None
        )
    if isinstance(first, nn.Embedding):
        x = torch.randint(0, first.num_embeddings, shape, generator=gen)
        note = f"synthetic token ids in [0, {first.num_embeddings}) (seed {seed})"
    else:
        x = torch.randn(shape, generator=gen)
        note = f"synthetic unit-Gaussian inputs (seed {seed})"
    return Batch(
        inputs=x, targets=None, source="synthetic " + "x".join(map(str, shape)), notes=[note]
    )


def _pick(d: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def _from_numpy(arr: np.ndarray, source: str) -> torch.Tensor:
    if arr.dtype.kind not in "biuf":
        raise DataError(
            f"{source}: holds {arr.dtype} values; nnhealth needs numeric arrays (bool, int, float)"
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # torch reads native byte order only
    return torch.from_numpy(np.ascontiguousarray(arr))


def interpret(obj: Any, source: str) -> Batch:
    """(inputs, targets), a dict with inputs/labels (or a dict of model keyword
    arguments with the targets under labels/targets), or a bare tensor."""
    if isinstance(obj, np.ndarray):
        obj = _from_numpy(obj, source)
    if isinstance(obj, torch.Tensor):
        return Batch(inputs=obj, targets=None, source=source)
    if isinstance(obj, (tuple, list)):
        if len(obj) == 1:
            return interpret(obj[0], source)
        if len(obj) == 2:
            inputs, targets = obj
            return Batch(
                inputs=_as_tensor(inputs, source),
                targets=_as_target(targets, source),
                source=source,
            )
        raise DataError(
            f"{source}: a sequence of {len(obj)} items; expected a tensor or (inputs, targets)"
        )
    if isinstance(obj, dict):
        inputs = _pick(obj, INPUT_KEYS)
        targets = _pick(obj, TARGET_KEYS)
        if inputs is None:
            kwargs = {k: v for k, v in obj.items() if k not in TARGET_KEYS}
            if not kwargs or not all(
                isinstance(v, (torch.Tensor, np.ndarray)) for v in kwargs.values()
            ):
                raise DataError(
                    f"{source}: a dict with keys [{', '.join(map(str, obj))}]; name the inputs "
                    "'inputs' (and the targets 'labels' or 'targets'), or give only tensors "
                    "(passed to the model as keyword arguments)"
                )
            # e.g. {"input_ids", "attention_mask", "labels"}: the model's keyword arguments
            inputs = {str(k): _as_tensor(v, source) for k, v in kwargs.items()}
            return Batch(inputs=inputs, targets=_as_target(targets, source), source=source)
        return Batch(
            inputs=_as_tensor(inputs, source), targets=_as_target(targets, source), source=source
        )
    raise DataError(f"{source}: holds a {type(obj).__name__}; expected tensors")


def _as_tensor(x: Any, source: str) -> Any:
    if isinstance(x, np.ndarray):
        return _from_numpy(x, source)
    if isinstance(x, (tuple, list)) and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in x):
        return tuple(_as_tensor(t, source) for t in x)
    return x


def _as_target(y: Any, source: str) -> torch.Tensor | None:
    if y is None:
        return None
    y = _as_tensor(y, source)
    if not isinstance(y, torch.Tensor):
        raise DataError(f"{source}: targets are a {type(y).__name__}, expected a tensor")
    return y


def load_batch(path_text: str) -> Batch:
    path = Path(path_text)
    if path.is_dir():
        raise DataError(f"{path_text}: is a directory; give a .pt, .npz or .npy file")
    if not path.is_file():
        raise DataError(f"{path_text}: no such data file")
    try:
        kind = detect.sniff(path)
    except OSError as exc:
        raise DataError(f"{path_text}: cannot read ({exc.strerror})") from exc
    try:
        if kind == detect.NPY:
            obj: Any = np.load(path, allow_pickle=False)
        elif kind == detect.NPZ:
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: npz[k] for k in npz.files}
        elif kind == detect.TORCH_PICKLE:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif kind in (detect.TRUNCATED_ZIP, detect.CORRUPT_ZIP):
            raise DataError(f"{path_text}: a truncated or corrupt archive; save the batch again")
        else:
            raise DataError(
                f"{path_text}: not a batch format nnhealth reads (.pt from torch.save, .npz, .npy)"
            )
    except DataError:
        raise
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path_text}: holds Python objects beyond tensors; save plain tensors "
            "(torch.save((inputs, targets), path))"
        ) from exc
    except ValueError as exc:
        raise DataError(
            f"{path_text}: cannot read without unpickling ({str(exc).splitlines()[0]}); save "
            "numeric arrays only"
        ) from exc
    except (RuntimeError, EOFError, OSError, KeyError) as exc:
        raise DataError(
            f"{path_text}: cannot read ({str(exc).splitlines()[0]}); truncated or corrupt?"
        ) from exc
    return interpret(obj, path_text)


def prepare(batch: Batch, dtype: torch.dtype | None, device: torch.device) -> Batch:
    """Validate (finite, non-empty), cast floating inputs to the model's dtype, move to device."""
    tensors = tensors_in(batch.inputs)
    if not tensors:
        raise DataError(f"{batch.source}: no input tensors in the batch")
    if tensors[0].ndim == 0:
        raise DataError(
            f"{batch.source}: the inputs are a single number (0-dim tensor); a batch needs "
            "its examples along the first dimension"
        )
    if tensors[0].shape[0] == 0:
        raise DataError(f"{batch.source}: the inputs are empty (shape {list(tensors[0].shape)})")
    for name, group in (("inputs", tensors), ("targets", tensors_in(batch.targets))):
        for t in group:
            if t.is_floating_point() or t.is_complex():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise DataError(
                        f"{batch.source}: the batch {name} hold {bad} NaN/Inf values of "
                        f"{t.numel()}; clean or impute them before scanning"
                    )
    notes = list(batch.notes)

    def conv(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
                notes.append(f"inputs cast from {obj.dtype} to the model's {dtype}")
                obj = obj.to(dtype)
            return obj.to(device)
        if isinstance(obj, tuple):
            return tuple(conv(o) for o in obj)
        if isinstance(obj, list):
            return [conv(o) for o in obj]
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        return obj

    inputs = conv(batch.inputs)
    targets = None if batch.targets is None else batch.targets.to(device)
    return Batch(
        inputs=inputs,
        targets=targets,
        source=batch.source,
        notes=sorted(set(notes), key=notes.index),
    )
