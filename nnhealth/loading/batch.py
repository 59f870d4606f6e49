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

from nnhealth import memory
from nnhealth._util import first_line, regular_file, tensors_in
from nnhealth.capture.precision import nonfinite_count
from nnhealth.errors import DataError, UsageError, flag, report_text
from nnhealth.loading import detect, infer, limits

_MAX_SYNTHETIC = 2**31 - 1  # values in a synthetic batch (8 GiB of float32)
# The pass holds several tensors the size of its input: the input itself, its cast to the
# model's dtype (prepare), and at least the first layer's output and its nonlinearity's,
# kept for the backward pass. An estimate, for a first layer that does not widen its
# input (a wider one, or an Embedding's vectors, needs more): enough to refuse at once a
# shape that cannot fit, rather than be killed by the kernel halfway through.
PASS_INPUT_MULTIPLE = 4
_MAX_NESTING = 16  # levels of tuples/lists/dicts in a batch (real ones have 1 or 2)
_MAX_ITEMS = 10_000  # tensors and containers in a batch (real ones have a handful)
INPUT_KEYS = ("inputs", "input", "x", "data", "images", "features", "arr_0")
TARGET_KEYS = ("targets", "target", "labels", "label", "y", "arr_1")


@dataclass
class Batch:
    inputs: Any  # a tensor, a tuple of tensors (positional) or a dict (keyword arguments)
    targets: torch.Tensor | None
    source: str
    notes: list[str] = field(default_factory=list)
    # a part of a larger batch (take): its examples start:stop of ``of``; seeded random
    # targets are drawn for the whole and sliced, so the parts' draws are the whole's
    part: tuple[int, int, int] | None = None

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

    def take(self, start: int, stop: int, what: str) -> Batch:
        """Examples ``start:stop``: every tensor (inputs and targets) whose first axis is
        the batch's is sliced along it; the others (a shared mask, a scalar) are kept.
        ``what`` names the part in ``source`` (e.g. "rank 1's shard")."""
        n = self.examples

        def cut(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj[start:stop] if obj.ndim and obj.shape[0] == n else obj
            if isinstance(obj, (tuple, list)):
                return type(obj)(cut(o) for o in obj)
            if isinstance(obj, dict):
                return {k: cut(v) for k, v in obj.items()}
            return obj

        return Batch(
            inputs=cut(self.inputs),
            targets=cut(self.targets),
            source=f"{self.source} ({what}: examples {start}:{stop})",
            notes=list(self.notes),
            part=_nested(self.part, start, min(stop, n), n),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "shape": self.shape,
            "targets_shape": None if self.targets is None else list(self.targets.shape),
        }


def _nested(
    outer: tuple[int, int, int] | None, start: int, stop: int, n: int
) -> tuple[int, int, int]:
    """Examples start:stop of a batch of n that is itself ``outer`` of a larger one."""
    if outer is None:
        return start, stop, n
    return outer[0] + start, outer[0] + stop, outer[2]


def parse_shape(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\s*\d+(\s*[x,]\s*\d+)*\s*", text or ""):
        raise UsageError(
            f"{flag('input_shape')} {text!r}: expected sizes joined by x, batch first, "
            "e.g. 64x3x32x32"
        )
    dims = tuple(int(d) for d in re.split(r"[x,]", text.replace(" ", "")))
    if any(d <= 0 for d in dims):
        raise UsageError(f"{flag('input_shape')} {text!r}: every size must be positive")
    return dims


def synthetic(shape: tuple[int, ...], seed: int, model: nn.Module | None) -> Batch:
    """Unit-Gaussian inputs from a seeded generator (integer ids for an Embedding model).
    A shape that is one example of the model's first layer (3x32x32 for a Conv2d(3, ...),
    784 for a Linear(784, ...)) gets the batch dimension it forgot: INFER_EXAMPLES."""
    layer = infer.input_layer(model, shape) if model is not None else None
    text = "x".join(map(str, shape))
    source = "synthetic " + text
    if layer is not None and layer.one_example(shape):
        shape = (infer.examples_for(shape), *shape)
        source = report_text(
            f"synthetic {'x'.join(map(str, shape))}: {flag('input_shape')} {text} read as one "
            f"example of {layer.label}: {layer.describe()}"
        )
    ids = layer.ids_below if layer is not None else None
    batch = _generate(shape, seed, ids, flag("input_shape"))
    batch.source = source
    return batch


def _generate(shape: tuple[int, ...], seed: int, ids_below: int | None, what: str) -> Batch:
    """Seeded unit-Gaussian floats, or integer ids in [0, ids_below), of ``shape``; refused
    when the pass could not hold it. ``what`` names where the shape came from."""
    values = math.prod(shape)
    text = "x".join(map(str, shape))
    if values > _MAX_SYNTHETIC:
        raise UsageError(
            f"{what} {text}: {values:.3g} values is more than this "
            f"tool will allocate ({_MAX_SYNTHETIC:.0e}); use a smaller batch"
        )
    dtype = torch.int64 if ids_below is not None else torch.float32
    nbytes = values * dtype.itemsize
    free = memory.available()
    if free is not None and nbytes * PASS_INPUT_MULTIPLE > free:
        raise UsageError(
            f"{what} {text}: {values:,} {str(dtype).removeprefix('torch.')} "
            f"values are {limits.size_text(nbytes)}, and the pass needs about "
            f"{PASS_INPUT_MULTIPLE}x its input ({limits.size_text(nbytes * PASS_INPUT_MULTIPLE)}), "
            f"more than the {limits.size_text(free)} of free memory; use a smaller batch"
        )
    gen = torch.Generator().manual_seed(seed)
    if ids_below is not None:
        x = torch.randint(0, ids_below, shape, generator=gen)
        note = f"synthetic token ids in [0, {ids_below}) (seed {seed})"
    else:
        x = torch.randn(shape, generator=gen)
        note = f"synthetic unit-Gaussian inputs (seed {seed})"
    return Batch(inputs=x, targets=None, source="synthetic " + text, notes=[note])


def inferred(model: nn.Module, seed: int) -> Batch:
    """A synthetic batch built from the model's first layer, for a scan given no batch.
    Raises UsageError saying why when none can be built."""
    layer = infer.input_layer(model)
    if layer.shape is None:
        raise UsageError(
            f"no batch, and none can be inferred from the model: {layer.why}; give {flag('data')} "
            f"FILE (.pt/.npz/.npy) or {flag('input_shape')} (batch first, e.g. 16x3x64x64)"
        )
    shape = (layer.examples, *layer.shape)
    text = "x".join(map(str, shape))
    batch = _generate(shape, seed, layer.ids_below, f"the inferred batch of {layer.name}")
    kind = f"token ids in [0, {layer.ids_below})" if layer.ids_below else "unit Gaussian"
    batch.source = f"inferred from {layer.label}: {layer.describe()} → {text} {kind}, seed {seed}"
    batch.notes = [
        report_text(
            f"no batch given: inferred from the first layer to receive the input "
            f"({layer.label}, {layer.how}); {layer.defaults}; give {flag('data')} or "
            f"{flag('input_shape')} to scan your own"
        )
    ]
    return batch


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
    while isinstance(obj, (tuple, list)) and len(obj) == 1:  # [[[x]]]: a loop, at any depth
        obj = obj[0]
    batch = _interpret(obj, source)
    validate(batch)
    return batch


def _interpret(obj: Any, source: str) -> Batch:
    if isinstance(obj, np.ndarray):
        obj = _from_numpy(obj, source)
    if isinstance(obj, torch.Tensor):
        return Batch(inputs=obj, targets=None, source=source)
    if isinstance(obj, (tuple, list)):
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


def _walk(obj: Any, source: str, role: str) -> list[torch.Tensor]:
    """The tensors in a batch structure, depth first. Refuses one nested deeper, or with
    more items, than any real batch: a few hundred bytes of pickle can nest 100000
    levels (recursion would overflow the stack) or share one list 1000 times per level
    (10 levels: 10^30 paths)."""
    found: list[torch.Tensor] = []
    stack: list[tuple[Any, int]] = [(obj, 0)]
    visited = 0
    while stack:
        item, depth = stack.pop()
        visited += 1
        if visited > _MAX_ITEMS:
            raise DataError(
                f"{source}: the batch {role} hold more than {_MAX_ITEMS:,} tensors and "
                "containers; give a tensor, (inputs, targets) or a dict of tensors"
            )
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list, dict)):
            if depth >= _MAX_NESTING:
                raise DataError(
                    f"{source}: the batch {role} are nested more than {_MAX_NESTING} levels "
                    "deep; give a tensor, (inputs, targets) or a dict of tensors"
                )
            items = list(item.values() if isinstance(item, dict) else item)
            stack.extend((child, depth + 1) for child in reversed(items))
    return found


def validate(batch: Batch) -> None:
    """Refuse tensors nnhealth cannot compute on (sparse, nested, meta, quantized) and
    structures nested deeper than any real batch, with one line each."""
    for role, obj in (("inputs", batch.inputs), ("targets", batch.targets)):
        for t in _walk(obj, batch.source, role):
            why = limits.unusable(t)
            if why:
                raise DataError(f"{batch.source}: the batch {role} hold {why}")


def _read(path: Path, path_text: str, kind: str) -> Any:
    """The object a batch file of format ``kind`` holds, its declared sizes checked first;
    never unpickling code."""
    if kind == detect.NPY:
        limits.check_npy(path, path_text, DataError)
        with limits.quiet_readers():
            return np.load(path, allow_pickle=False)
    if kind == detect.NPZ:
        limits.check_npz(path, path_text, DataError)
        with limits.quiet_readers(), np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if kind == detect.TORCH_PICKLE:
        limits.torch_pickles(
            path,
            path_text,
            DataError,
            trusted=False,
            hint="Save plain tensors: torch.save((inputs, targets), path)",
        )
        with limits.quiet_readers():
            return torch.load(path, map_location="cpu", weights_only=True)
    if kind in (detect.TRUNCATED_ZIP, detect.CORRUPT_ZIP):
        raise DataError(f"{path_text}: a truncated or corrupt archive; save the batch again")
    raise DataError(
        f"{path_text}: not a batch format nnhealth reads (.pt from torch.save, .npz, .npy)"
    )


def _unreadable(path_text: str, exc: Exception) -> DataError:
    """The one line for an exception a reader raised on the batch file."""
    if isinstance(exc, pickle.UnpicklingError):
        return DataError(
            f"{path_text}: holds Python objects beyond tensors; save plain tensors "
            "(torch.save((inputs, targets), path))"
        )
    if isinstance(exc, RecursionError):
        return DataError(
            f"{path_text}: nests objects too deeply to read (a damaged or hostile file); "
            "save plain tensors again"
        )
    if isinstance(exc, MemoryError):
        return DataError(f"{path_text}: ran out of memory while loading it; save a smaller batch")
    if isinstance(exc, ValueError):
        return DataError(
            f"{path_text}: cannot read without unpickling ({first_line(exc)}); save "
            "numeric arrays only"
        )
    if isinstance(exc, (RuntimeError, EOFError, OSError, KeyError)):
        return DataError(f"{path_text}: cannot read ({first_line(exc)}); truncated or corrupt?")
    return DataError(
        f"{path_text}: cannot read ({type(exc).__name__}: {first_line(exc)}); truncated or corrupt?"
    )


def load_batch(path_text: str) -> Batch:
    path = Path(path_text)
    if path.is_dir():
        raise DataError(f"{path_text}: is a directory; give a .pt, .npz or .npy file")
    if not path.exists():
        raise DataError(f"{path_text}: no such data file")
    regular_file(path, "batch", DataError)  # a FIFO blocks, /dev/zero never ends
    try:
        kind = detect.sniff(path, DataError)
    except OSError as exc:
        raise DataError(f"{path_text}: cannot read ({exc.strerror or first_line(exc)})") from exc
    try:
        obj = _read(path, path_text, kind)
    except DataError:
        raise
    except Exception as exc:  # a damaged file makes the readers raise anything
        raise _unreadable(path_text, exc) from exc
    batch = interpret(obj, path_text)
    limits.check_tensors(
        [
            (f"{role}", t)
            for role, obj in (("inputs", batch.inputs), ("targets", batch.targets))
            for t in _walk(obj, path_text, role)
        ],
        path_text,
        DataError,
        "the batch tensor",
        path.stat().st_size,
    )
    return batch


def _overflowed(
    source: str, role: str, before: torch.Tensor, after: torch.Tensor
) -> DataError | None:
    """Finite values that a cast to the model's dtype turned into +-inf (float64 1e300 to
    float32, float32 70000 to float16): a DataError saying how many and what to do."""
    if not after.is_floating_point():
        return None
    bad = nonfinite_count(after)  # float8 too, which has no isfinite kernel
    if not bad:
        return None
    largest = float(before.detach().abs().max().to(torch.float64))
    return DataError(
        f"{source}: {bad} of {before.numel()} batch {role} values overflow to +-inf when "
        f"cast from {before.dtype} to the model's {after.dtype} (largest magnitude "
        f"{largest:.3g}; {after.dtype} holds up to {torch.finfo(after.dtype).max:.3g}); "
        f"rescale or normalize the {role} (e.g. to mean 0, std 1) before scanning"
    )


def prepare(batch: Batch, dtype: torch.dtype | None, device: torch.device) -> Batch:
    """Validate (finite, non-empty, dense), cast floating inputs to the model's dtype (no
    value may overflow on the way), move to device."""
    validate(batch)
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
                cast = obj.to(dtype)
                error = _overflowed(batch.source, "inputs", obj, cast)
                if error:
                    raise error
                obj = cast
            return obj.to(device)
        if isinstance(obj, tuple):
            return tuple(conv(o) for o in obj)
        if isinstance(obj, list):
            return [conv(o) for o in obj]
        if isinstance(obj, dict):
            return {k: conv(v) for k, v in obj.items()}
        return obj

    inputs = conv(batch.inputs)
    targets = batch.targets
    if (
        targets is not None
        and dtype is not None
        and dtype.is_floating_point
        and targets.is_floating_point()
        and targets.dtype != dtype
    ):
        # the loss casts float targets to the output's dtype (the model's)
        error = _overflowed(batch.source, "targets", targets, targets.to(dtype))
        if error:
            raise error
    targets = None if targets is None else targets.to(device)
    return Batch(
        inputs=inputs,
        targets=targets,
        source=batch.source,
        notes=sorted(set(notes), key=notes.index),
        part=batch.part,
    )
