"""What a file declares, checked before anything is allocated.

A few kilobytes can declare gigabytes: a zip member that inflates a thousandfold, a
pickled storage of 10^12 elements, an ``.npy`` header with a huge shape, a call such as
``bytearray(10**11)`` inside a pickle, a tensor expanded with stride 0 that the weight
checks would materialize. Each loader compares what the file declares with the file's
own size and with the memory this process may still allocate
(:func:`nnhealth.memory.available`) and refuses, in one line, what does not fit.

Nothing here executes a pickle: :func:`walk_pickle` runs its opcodes symbolically
(``pickletools.genops``), tracking constants, tuples, globals and persistent ids.

The limits (documented in the README):

- ``MAX_INFLATION`` / ``INFLATION_FLOOR``: a zip (``.pt``, ``.npz``) may declare at most
  100x its file size uncompressed, once that exceeds 256 MiB (a zip bomb otherwise);
- every size a file declares (zip members, pickled storages, ``.npy`` arrays, calls in a
  pickle, tensors expanded beyond their storage) must fit the free memory;
- a legacy ``torch.save`` file or an ``.npy`` array must hold the bytes it declares;
- ``MAX_CALL_BYTES``: a pickle may not allocate from numbers written in it (e.g.
  ``bytearray(n)``, ``torch.FloatTensor(n, m)``) more than its file size or 16 MiB.
"""

from __future__ import annotations

import contextlib
import pickletools
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nnhealth import memory

MAX_INFLATION = 100  # uncompressed bytes a zip may declare per byte of file (above the floor)
# real data compresses 2-10x; a 256 MiB all-zero array saved with np.savez_compressed would
# trip the ratio, so below this much any ratio is allowed: inflating it is cheap.
INFLATION_FLOOR = 256 * 2**20
MAX_CALL_BYTES = 16 * 2**20  # allocated by calls in a pickle beyond its own file size
LEGACY_PICKLES = 5  # magic number, protocol, system info, the object, the storage keys
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_NPY_HEADER_MAX = 10000  # numpy's own max_header_size default


@contextlib.contextmanager
def quiet_readers() -> Iterator[None]:
    """torch.load's and numpy's own warnings (TypedStorage deprecation, sparse CSR beta)
    are not the user's to act on, and would break the one-line error contract."""
    with warnings.catch_warnings():
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        yield


def size_text(nbytes: float) -> str:
    """1.49 GiB, 12 MiB, 300 bytes."""
    if nbytes >= 2**70:  # sizes read from a file can be astronomical
        return "more than 2^70 bytes"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} bytes"


def fits_memory(nbytes: int, what: str, where: str, error: type[Exception], fix: str) -> None:
    """Raise ``error`` when ``nbytes`` is more than this process may still allocate."""
    free = memory.available()
    if free is not None and nbytes > free:
        raise error(
            f"{where}: {what} needs {size_text(nbytes)}, more than the {size_text(free)} of "
            f"free memory; {fix}"
        )


# --- zip archives: declared member sizes, before anything inflates ------------------------


def check_zip(zf: zipfile.ZipFile, file_size: int, where: str, error: type[Exception]) -> None:
    """The members' declared uncompressed sizes against the file size and free memory.

    The declared size bounds what any reader inflates (Python's zipfile and torch's
    miniz both stop there), so this runs before ``testzip``, ``np.load`` or
    ``torch.load`` inflate anything."""
    infos = zf.infolist()
    declared = sum(info.file_size for info in infos)
    if declared > INFLATION_FLOOR and declared > MAX_INFLATION * max(file_size, 1):
        biggest = max(infos, key=lambda info: info.file_size)
        raise error(
            f"{where}: a {size_text(file_size)} archive that inflates to {size_text(declared)} "
            f"({declared / max(file_size, 1):,.0f}x; member {biggest.filename!r} alone "
            f"{size_text(biggest.file_size)}): a zip bomb, or data far more compressible than "
            f"real tensors; refusing to inflate it. Save it uncompressed (torch.save, np.savez)"
        )
    fits_memory(declared, "reading its members", where, error, "free memory, or use a smaller file")


# --- .npy / .npz: the header's shape and dtype against the bytes present ------------------


def npy_declared(fh: IO[bytes]) -> tuple[int, int]:
    """(header bytes, array bytes) an ``.npy`` stream declares; ValueError when malformed."""
    import numpy as np
    from numpy.lib import format as npformat

    version = npformat.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = npformat.read_array_header_1_0(fh, max_header_size=_NPY_HEADER_MAX)
    elif version in ((2, 0), (3, 0)):  # 3.0 differs only in encoding the dtype's names
        shape, _, dtype = npformat.read_array_header_2_0(fh, max_header_size=_NPY_HEADER_MAX)
    else:
        raise ValueError(f"unknown .npy format version {version}")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    dtype = np.dtype(dtype)
    header = fh.tell()
    return header, (0 if dtype.hasobject else _prod(shape) * dtype.itemsize)


def check_npy(path: Path, where: str, error: type[Exception]) -> None:
    size = path.stat().st_size
    with path.open("rb") as fh:
        try:
            header, nbytes = npy_declared(fh)
        except Exception as exc:  # numpy's header parser raises many kinds on bad text
            raise error(
                f"{where}: not a readable .npy file ({_first(exc)}); save it again"
            ) from exc
    if header + nbytes > size:
        raise error(
            f"{where}: its header declares {size_text(nbytes)} of array data but the file "
            f"holds {size_text(max(size - header, 0))}: truncated or corrupt; save it again"
        )
    fits_memory(nbytes, "the array", where, error, "save a smaller batch")


def check_npz(path: Path, where: str, error: type[Exception]) -> None:
    """Each member's header against that member's declared uncompressed size (bounded
    already by :func:`check_zip`); the arrays' total against free memory."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as fh:
                try:
                    header, nbytes = npy_declared(fh)
                except Exception as exc:  # numpy's header parser raises many kinds
                    raise error(
                        f"{where}: member {info.filename!r} is not a readable .npy array "
                        f"({_first(exc)}); save the batch again"
                    ) from exc
            if header + nbytes > info.file_size:
                raise error(
                    f"{where}: member {info.filename!r} declares {size_text(nbytes)} of array "
                    f"data but holds {size_text(max(info.file_size - header, 0))}: truncated "
                    "or corrupt; save the batch again"
                )
            total += nbytes
    fits_memory(total, "its arrays", where, error, "save a smaller batch")


# --- pickles, run symbolically -------------------------------------------------------------


class _Opaque:
    """A value the symbolic run does not follow (a dict, an object, a call's result)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "?"


OPAQUE = _Opaque()
_MARK = object()


@dataclass(frozen=True)
class Global:
    name: str  # module.qualname, with Python 2 module names mapped as pickle does


@dataclass(frozen=True)
class Storage:
    key: str
    itemsize: int
    nbytes: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor a rebuild function returns: its logical bytes (numel x itemsize)."""

    nbytes: int | None
    itemsize: int


@dataclass(frozen=True)
class EncodedBytes:
    """``_codecs.encode(text, "latin1")``: how protocol 2 pickles bytes."""


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

_ITEMSIZE = {
    "Double": 8,
    "Float": 4,
    "Half": 2,
    "BFloat16": 2,
    "Long": 8,
    "Int": 4,
    "Short": 2,
    "Char": 1,
    "Byte": 1,
    "Bool": 1,
    "ComplexDouble": 16,
    "ComplexFloat": 8,
    "QUInt8": 1,
    "QInt8": 1,
    "QInt32": 4,
    "QUInt4x2": 1,
    "QUInt2x4": 1,
    "Untyped": 1,
    "Typed": 1,
}


def _itemsize(name: str, suffix: str) -> int:
    """Bytes per element of ``torch.FloatStorage`` / ``torch.cuda.HalfTensor`` / dtypes."""
    last = name.rsplit(".", 1)[-1]
    if last.endswith(suffix):
        return _ITEMSIZE.get(last[: -len(suffix)], 8)
    import torch

    dtype = getattr(torch, last, None)
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    return 8  # unknown: the widest common element, so a size is never underestimated


def _allocating_class(name: str) -> bool:
    """Tensor and storage classes: calling them with sizes allocates (torch.save never
    calls them: it rebuilds tensors from storages)."""
    if not name.startswith("torch."):
        return False
    last = name.rsplit(".", 1)[-1]
    return last == "Tensor" or last.endswith(("Tensor", "Storage"))


@dataclass
class PickleFacts:
    """What one or more pickles would do, found without running them."""

    calls: list[str] = field(default_factory=list)  # names called via REDUCE / INST / OBJ
    suspicious: list[tuple[str, int | None]] = field(default_factory=list)  # (call, bytes)
    storages: dict[str, int] = field(default_factory=dict)  # key -> declared bytes
    allocations: int = 0  # bytes that calls would allocate (materialized views, qtensors)
    refused: list[str] = field(default_factory=list)  # states an allowlisted class would
    # loop over (RNNBase.__setstate__ iterates num_layers from the file)


# RNNBase.__setstate__ loops (quadratically) over the file's num_layers when its
# _all_weights is in an old layout: 10,000 layers cost 2 s, 3,000,000 never end.
# Real RNNs have a handful of layers.
MAX_RNN_LAYERS = 1000
_RNN_CLASSES = {f"torch.nn.modules.rnn.{n}" for n in ("RNNBase", "RNN", "LSTM", "GRU")}


@dataclass(frozen=True)
class Instance:
    """An object a pickle creates with cls.__new__ (NEWOBJ), kept for its BUILD."""

    cls: str


def _build(obj: Any, state: Any, facts: PickleFacts) -> None:
    """BUILD(obj, state): the allowlisted classes whose __setstate__ loops on the state."""
    if not (isinstance(obj, Instance) and obj.cls in _RNN_CLASSES and isinstance(state, dict)):
        return
    layers = state.get("num_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > MAX_RNN_LAYERS:
        facts.refused.append(
            f"its {obj.cls.rsplit('.', 1)[-1]} declares num_layers={layers} (at most "
            f"{MAX_RNN_LAYERS}), over which loading loops"
        )


_SATURATE = 1 << 100  # beyond any memory: products stop growing here (no bigint blow-up)


def _prod(values: Iterable[int]) -> int:
    """The product of sizes (negative ones as 0), saturating at 2^100: a pickle can hold
    a tuple of a million 2^63 sizes, whose exact product would take minutes."""
    result = 1
    for v in values:
        result = min(result * max(v, 0), _SATURATE)
        if result == 0:
            return 0
    return result


def _ints(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (tuple, list)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    return None


def _describe_call(name: str, args: Any) -> str:
    shown = args if isinstance(args, tuple) else (args,)
    text = ", ".join(
        repr(a)
        if isinstance(a, (float, str)) or (isinstance(a, int) and abs(a) < 10**30)
        else "..."
        for a in shown[:4]
    )
    return f"{name}({text}{', ...' if len(shown) > 4 else ''})"


# Calls, by the callable's name: each handler takes (name, args, facts) and returns the
# symbolic result of name(*args), recording what the call would allocate.


def _bytearray(name: str, args: tuple, facts: PickleFacts) -> Any:
    # torch.save writes bytearray(_codecs.encode(text, "latin1")); a number (or a
    # one-element tensor, which has __index__) is an allocation of that many bytes
    if args and not isinstance(args[0], (str, bytes, EncodedBytes)):
        n = min(max(args[0], 0), _SATURATE) if isinstance(args[0], int) else None
        facts.suspicious.append((_describe_call("bytearray", args), n))
    return OPAQUE


def _encode(name: str, args: tuple, facts: PickleFacts) -> Any:
    return EncodedBytes()


def _allocating_call(name: str, args: tuple, facts: PickleFacts) -> Any:
    """``torch.FloatTensor(n, m)``, ``torch.FloatStorage(n)``: allocates from numbers."""
    numbers = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
    if args and (numbers or not all(isinstance(a, TensorRef) for a in args)):
        size = _prod(numbers) * _itemsize(name, "Tensor")
        facts.suspicious.append((_describe_call(name, args), size if numbers else None))
    return TensorRef(None, 4)


def _rebuild_tensor(name: str, args: tuple, facts: PickleFacts) -> Any:
    storage = args[0] if args else None
    size = _ints(args[2]) if len(args) > 2 else None
    itemsize = storage.itemsize if isinstance(storage, Storage) else 8
    if name.endswith("_v3") and len(args) > 6 and isinstance(args[6], Global):
        itemsize = _itemsize(args[6].name, "")
    return TensorRef(None if size is None else _prod(size) * itemsize, itemsize)


def _rebuild_qtensor(name: str, args: tuple, facts: PickleFacts) -> Any:
    # torch._empty_affine_quantized(size) allocates before the storage is attached
    storage = args[0] if args else None
    size = _ints(args[2]) if len(args) > 2 else None
    held = storage.nbytes if isinstance(storage, Storage) else 0
    itemsize = storage.itemsize if isinstance(storage, Storage) else 1
    need = None if size is None else _prod(size) * itemsize
    if need is None or need > held:
        facts.suspicious.append((_describe_call("_rebuild_qtensor", args[1:3]), need))
    else:
        facts.allocations += need
    return TensorRef(need, itemsize)


def _rebuild_device_tensor(name: str, args: tuple, facts: PickleFacts) -> Any:
    # data.to(dtype, device): materializes a view, at the target dtype's width
    data = args[0] if args else None
    itemsize = _itemsize(args[1].name, "") if len(args) > 1 and isinstance(args[1], Global) else 8
    if isinstance(data, TensorRef) and data.nbytes is not None:
        need = data.nbytes // max(data.itemsize, 1) * itemsize
        facts.allocations += need
        return TensorRef(need, itemsize)
    facts.suspicious.append((_describe_call(name.rsplit(".", 1)[-1], args), None))
    return OPAQUE


def _first_argument(name: str, args: tuple, facts: PickleFacts) -> Any:
    return args[0] if args else OPAQUE


def _rebuild_from_type(name: str, args: tuple, facts: PickleFacts) -> Any:
    # (func, new_type, args, state): the unpickler lets it call func(*args)
    if len(args) > 2:
        facts.calls.pop()
        return _call(args[0], args[2], facts)
    return OPAQUE


def _size(name: str, args: tuple, facts: PickleFacts) -> Any:
    return args[0] if args and isinstance(args[0], (tuple, list)) else OPAQUE


def _opaque_call(name: str, args: tuple, facts: PickleFacts) -> Any:
    return OPAQUE


_CALLS: dict[str, Callable[[str, tuple, PickleFacts], Any]] = {
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor,
    "torch._utils._rebuild_qtensor": _rebuild_qtensor,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor,
    "torch._utils._rebuild_device_tensor_from_numpy": _rebuild_device_tensor,
    "torch._utils._rebuild_parameter": _first_argument,
    "torch._utils._rebuild_parameter_with_state": _first_argument,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _size,
}


def _call(func: Any, args: Any, facts: PickleFacts) -> Any:
    """The symbolic result of ``func(*args)``; records calls and what they allocate."""
    if not isinstance(func, Global):
        return OPAQUE
    name = func.name
    facts.calls.append(name)
    args = args if isinstance(args, tuple) else ()
    if _allocating_class(name):  # never a name in _CALLS (those are not classes)
        return _allocating_call(name, args, facts)
    return _CALLS.get(name, _opaque_call)(name, args, facts)


def _persistent(pid: Any, facts: PickleFacts) -> Any:
    """torch.save's storage ids: ('storage', type, key, location, numel[, view]); the
    legacy format also pickles module classes as ('module', class, file, source)."""
    if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "module":
        return pid[1]  # the class: a call on it is a call of the class
    if (
        isinstance(pid, tuple)
        and len(pid) >= 5
        and pid[0] == "storage"
        and isinstance(pid[1], Global)
        and isinstance(pid[4], int)
    ):
        itemsize = _itemsize(pid[1].name, "Storage")
        nbytes = min(max(pid[4], 0), _SATURATE) * itemsize  # negative: torch refuses it
        key = str(pid[2])
        facts.storages[key] = max(nbytes, facts.storages.get(key, 0))
        return Storage(key, itemsize, nbytes)
    return OPAQUE


_CONSTANTS = {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "BYTEARRAY8",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "FLOAT",
    "BINFLOAT",
}


def _pairs_to_dict(items: list[Any]) -> dict[str, Any]:
    """key, value, key, value... as a dict of the string keys (others are not needed)."""
    return {k: v for k, v in zip(items[::2], items[1::2], strict=False) if isinstance(k, str)}


def _global(module: str, qualname: str) -> Global:
    return Global(f"{_PY2_MODULES.get(module, module)}.{qualname}")


def _named_global(arg: Any) -> Global:
    """GLOBAL's and INST's argument: "module qualname"."""
    module, _, qualname = str(arg).partition(" ")
    return _global(module, qualname)


class _Machine:
    """The unpickler's stack and memo, holding what the walk follows (constants, tuples,
    lists, string-keyed dicts, globals, storages, tensor sizes) and OPAQUE for the rest.
    One method per family of opcodes, chosen through ``_OPS``; a missing operand reads
    as OPAQUE rather than failing."""

    def __init__(self, facts: PickleFacts) -> None:
        self.facts = facts
        self.stack: list[Any] = []
        self.memo: dict[Any, Any] = {}

    def pop(self) -> Any:
        return self.stack.pop() if self.stack else OPAQUE

    def top(self, empty: Any = OPAQUE) -> Any:
        return self.stack[-1] if self.stack else empty

    def pop_mark(self) -> list[Any]:
        items: list[Any] = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                break
            items.append(item)
        items.reverse()
        return items

    # pushing values
    def constant(self, op: Any, arg: Any) -> None:
        self.stack.append(arg)

    def none(self, op: Any, arg: Any) -> None:
        self.stack.append(None)

    def boolean(self, op: Any, arg: Any) -> None:
        self.stack.append(op.name == "NEWTRUE")

    def mark(self, op: Any, arg: Any) -> None:
        self.stack.append(_MARK)

    def opaque(self, op: Any, arg: Any) -> None:  # EMPTY_SET
        self.stack.append(OPAQUE)

    # tuples, lists, dicts, sets
    def tuple_(self, op: Any, arg: Any) -> None:
        self.stack.append(tuple(self.pop_mark()))

    def empty_tuple(self, op: Any, arg: Any) -> None:
        self.stack.append(())

    def small_tuple(self, op: Any, arg: Any) -> None:  # TUPLE1, TUPLE2, TUPLE3
        items = [self.pop() for _ in range(int(op.name[-1]))]
        self.stack.append(tuple(reversed(items)))

    def empty_list(self, op: Any, arg: Any) -> None:
        self.stack.append([])

    def list_(self, op: Any, arg: Any) -> None:
        self.stack.append(self.pop_mark())

    def append(self, op: Any, arg: Any) -> None:
        item = self.pop()
        if isinstance(self.top(), list):
            self.stack[-1].append(item)

    def appends(self, op: Any, arg: Any) -> None:
        items = self.pop_mark()
        if isinstance(self.top(), list):
            self.stack[-1].extend(items)

    def empty_dict(self, op: Any, arg: Any) -> None:
        self.stack.append({})  # keys and values kept for BUILD's state (_build)

    def dict_(self, op: Any, arg: Any) -> None:
        self.stack.append(_pairs_to_dict(self.pop_mark()))

    def setitem(self, op: Any, arg: Any) -> None:
        value, key = self.pop(), self.pop()
        if isinstance(self.top(), dict):
            self.stack[-1].update(_pairs_to_dict([key, value]))

    def setitems(self, op: Any, arg: Any) -> None:
        items = self.pop_mark()
        if isinstance(self.top(), dict):
            self.stack[-1].update(_pairs_to_dict(items))

    def frozenset_(self, op: Any, arg: Any) -> None:
        self.pop_mark()
        self.stack.append(OPAQUE)

    # globals, calls, objects
    def global_(self, op: Any, arg: Any) -> None:
        self.stack.append(_named_global(arg))

    def inst(self, op: Any, arg: Any) -> None:  # calls the class with the args after the mark
        cls = _named_global(arg)
        self.stack.append(_call(cls, tuple(self.pop_mark()), self.facts))

    def stack_global(self, op: Any, arg: Any) -> None:
        qualname, module = self.pop(), self.pop()
        if isinstance(module, str) and isinstance(qualname, str):
            self.stack.append(_global(module, qualname))
        else:
            self.stack.append(Global("?"))

    def obj(self, op: Any, arg: Any) -> None:  # cls(*args), the class first after the mark
        items = self.pop_mark()
        self.stack.append(_call(items[0], tuple(items[1:]), self.facts) if items else OPAQUE)

    def reduce(self, op: Any, arg: Any) -> None:
        call_args, func = self.pop(), self.pop()
        self.stack.append(_call(func, call_args, self.facts))

    def newobj(self, op: Any, arg: Any) -> None:  # NEWOBJ, NEWOBJ_EX: cls.__new__(cls, *args)
        if op.name == "NEWOBJ_EX":
            self.pop()  # kwargs
        call_args, cls = self.pop(), self.pop()
        if (
            isinstance(cls, Global)
            and _allocating_class(cls.name)
            and call_args not in ((), OPAQUE)
        ):
            self.facts.suspicious.append((_describe_call(cls.name + ".__new__", call_args), None))
        self.stack.append(Instance(cls.name) if isinstance(cls, Global) else OPAQUE)

    def build(self, op: Any, arg: Any) -> None:
        state = self.pop()
        _build(self.top(), state, self.facts)

    def persistent_id(self, op: Any, arg: Any) -> None:  # BINPERSID, PERSID
        pid = self.pop() if op.name == "BINPERSID" else arg
        self.stack.append(_persistent(pid, self.facts))

    # the memo and the stack itself
    def put(self, op: Any, arg: Any) -> None:
        self.memo[arg] = self.top()

    def memoize(self, op: Any, arg: Any) -> None:
        self.memo[len(self.memo)] = self.top()

    def get(self, op: Any, arg: Any) -> None:
        self.stack.append(self.memo.get(arg, OPAQUE))

    def discard(self, op: Any, arg: Any) -> None:  # POP
        self.pop()

    def discard_mark(self, op: Any, arg: Any) -> None:  # POP_MARK, ADDITEMS
        self.pop_mark()

    def dup(self, op: Any, arg: Any) -> None:
        self.stack.append(self.top())

    def nothing(self, op: Any, arg: Any) -> None:  # PROTO, FRAME
        pass

    def other(self, op: Any, arg: Any) -> None:
        """EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER: opaque values, by the opcode's own
        description of what it takes from the stack and leaves on it."""
        if pickletools.markobject in op.stack_before:
            self.pop_mark()
        else:
            for _ in op.stack_before:
                self.pop()
        for item in op.stack_after:
            self.stack.append(_MARK if item is pickletools.markobject else OPAQUE)


_OPS: dict[str, Callable[[_Machine, Any, Any], None]] = {
    **dict.fromkeys(_CONSTANTS, _Machine.constant),
    "NONE": _Machine.none,
    "NEWTRUE": _Machine.boolean,
    "NEWFALSE": _Machine.boolean,
    "MARK": _Machine.mark,
    "TUPLE": _Machine.tuple_,
    "EMPTY_TUPLE": _Machine.empty_tuple,
    "TUPLE1": _Machine.small_tuple,
    "TUPLE2": _Machine.small_tuple,
    "TUPLE3": _Machine.small_tuple,
    "EMPTY_LIST": _Machine.empty_list,
    "LIST": _Machine.list_,
    "APPEND": _Machine.append,
    "APPENDS": _Machine.appends,
    "EMPTY_DICT": _Machine.empty_dict,
    "EMPTY_SET": _Machine.opaque,
    "DICT": _Machine.dict_,
    "FROZENSET": _Machine.frozenset_,
    "SETITEM": _Machine.setitem,
    "SETITEMS": _Machine.setitems,
    "ADDITEMS": _Machine.discard_mark,
    "GLOBAL": _Machine.global_,
    "INST": _Machine.inst,
    "STACK_GLOBAL": _Machine.stack_global,
    "OBJ": _Machine.obj,
    "REDUCE": _Machine.reduce,
    "NEWOBJ": _Machine.newobj,
    "NEWOBJ_EX": _Machine.newobj,
    "BUILD": _Machine.build,
    "BINPERSID": _Machine.persistent_id,
    "PERSID": _Machine.persistent_id,
    "PUT": _Machine.put,
    "BINPUT": _Machine.put,
    "LONG_BINPUT": _Machine.put,
    "MEMOIZE": _Machine.memoize,
    "GET": _Machine.get,
    "BINGET": _Machine.get,
    "LONG_BINGET": _Machine.get,
    "POP": _Machine.discard,
    "POP_MARK": _Machine.discard_mark,
    "DUP": _Machine.dup,
    "PROTO": _Machine.nothing,
    "FRAME": _Machine.nothing,
}


def walk_pickle(stream: Any, facts: PickleFacts) -> Any:
    """Run one pickle's opcodes symbolically up to its STOP; return the value it builds.

    ``stream`` is bytes or a file-like object (read, readline) left just after the
    STOP. Raises ValueError for a malformed pickle."""
    machine = _Machine(facts)
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name == "STOP":
                return machine.top(empty=None)
            _OPS.get(op.name, _Machine.other)(machine, op, arg)
    except (struct.error, OverflowError, EOFError, IndexError, TypeError, KeyError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    raise ValueError("pickle exhausted before seeing STOP")


def _first(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _zip_pickles(path: Path, facts: PickleFacts) -> None:
    with zipfile.ZipFile(path) as zf:
        # every .pkl member: torch reads <archive>/data.pkl, so a decoy must not hide it
        for info in zf.infolist():
            if info.filename.endswith(".pkl"):
                walk_pickle(zf.read(info), facts)


class _Clamped:
    """A file for ``pickletools.genops`` that never reads past the end: a file object's
    read(n) allocates n bytes up front, and n comes from the pickle (BINBYTES8 can say
    2^63); readline stops after ``_MAX_LINE`` (torch.save's lines are GLOBAL names)."""

    _MAX_LINE = 2**20

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self.fh, self.size = fh, size

    def read(self, n: int = -1) -> bytes:
        left = max(self.size - self.fh.tell(), 0)
        return self.fh.read(left if n < 0 or n > left else n)

    def readline(self) -> bytes:
        return self.fh.readline(self._MAX_LINE)

    def tell(self) -> int:
        return self.fh.tell()


def _legacy_pickles(path: Path, facts: PickleFacts, where: str, error: type[Exception]) -> None:
    """The legacy (non-zip) torch.save layout: five pickles, then for each storage key
    (in the order the fifth pickle lists them) an 8-byte element count and the raw bytes.
    torch allocates each storage from the pickled element count before reading it."""
    size = path.stat().st_size
    if tarfile.is_tarfile(path):
        # torch.load tries the oldest (tar) format first; it allocates storages from
        # sizes in the file that this walk does not follow
        raise ValueError("a tar archive (the pre-1.0 torch.save format is not read)")
    with path.open("rb") as fh:
        stream = _Clamped(fh, size)
        magic = walk_pickle(stream, facts)
        if magic != _LEGACY_MAGIC:
            raise ValueError("no torch.save magic number")
        for _ in range(LEGACY_PICKLES - 1):
            keys = walk_pickle(stream, facts)
        data_start = stream.tell()
    declared = 0
    if isinstance(keys, list):
        declared = sum(8 + facts.storages.get(str(k), 0) for k in keys)
    declared = max(declared, sum(facts.storages.values()))
    if data_start + declared > size:
        raise error(
            f"{where}: its pickle declares {size_text(declared)} of tensor data but the file "
            f"holds {size_text(size - data_start)} after it: truncated or corrupt; save it again"
        )


def _suspicious_calls(
    facts: PickleFacts, path: Path, where: str, error: type[Exception], hint: str
) -> int:
    """The bytes the pickle's calls allocate from numbers in the file; raises when any
    amount is unknown, or when they add up to more than the file or MAX_CALL_BYTES."""
    unknown = [call for call, n in facts.suspicious if n is None]
    total = sum(n for _, n in facts.suspicious if n is not None)
    if unknown or total > max(path.stat().st_size, MAX_CALL_BYTES):
        call = unknown[0] if unknown else max(facts.suspicious, key=lambda c: c[1] or 0)[0]
        amount = "" if unknown else f" ({size_text(total)})"
        raise error(
            f"{where}: the pickle calls {call}, which allocates from numbers written in "
            f"the file{amount} (torch.save never does); refusing to load it. {hint}"
        )
    return total


def torch_pickles(
    path: Path, where: str, error: type[Exception], trusted: bool, hint: str
) -> PickleFacts:
    """Walk every pickle of a torch.save file (zip: each ``.pkl`` member; legacy: the
    pickle sequence up to the raw storage bytes) and check what it declares: storages
    against the file and free memory, calls that would allocate from numbers in the
    file. Returns the facts; the caller judges ``calls`` against its allowlist.

    ``trusted``: the user vouched for the file; a pickle this walker cannot follow is
    left to torch.load, and only sizes are checked."""
    facts = PickleFacts()
    with path.open("rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"  # how torch.load tells the two formats apart
    try:
        if is_zip:
            _zip_pickles(path, facts)
        else:
            _legacy_pickles(path, facts, where, error)
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:
        if trusted:
            return PickleFacts()
        raise error(
            f"{where}: cannot read this torch.save file (its pickle is malformed: "
            f"{_first(exc)}); it looks truncated or corrupt: save it again"
        ) from None
    if not trusted and facts.refused:
        raise error(f"{where}: {facts.refused[0]}; refusing to load it. {hint}")
    if not trusted and facts.suspicious:
        facts.allocations += _suspicious_calls(facts, path, where, error, hint)
    # what rebuilding allocates beyond the stored bytes (a stride-0 view materialized by
    # _rebuild_device_tensor_from_cpu_tensor) is bounded like a zip's inflation
    size = path.stat().st_size
    if not trusted and facts.allocations > max(INFLATION_FLOOR, MAX_INFLATION * size):
        raise error(
            f"{where}: rebuilding its tensors would allocate {size_text(facts.allocations)} "
            f"from a {size_text(size)} file, beyond {MAX_INFLATION}x its size (torch.save "
            f"never does: it stores what it loads); refusing to load it. {hint}"
        )
    # a zip's storages are its members, already weighed by check_zip
    declared = 0 if is_zip else sum(facts.storages.values())
    fits_memory(
        declared + facts.allocations,
        "the tensors its pickle declares",
        where,
        error,
        "free memory, or use a smaller file",
    )
    return facts


# --- loaded tensors: views that would be materialized --------------------------------------


def _span(t: Any) -> int:
    """Bytes of storage a strided tensor actually covers."""
    if t.numel() == 0:
        return 0
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def overlapping_bytes(t: Any) -> int:
    """Bytes by which a strided tensor's logical size exceeds the storage it covers (a
    stride-0 ``expand`` or overlapping ``as_strided``); 0 for ordinary tensors."""
    return t.numel() * t.element_size() - _span(t)


def check_tensors(
    named: Iterable[tuple[str, Any]],
    where: str,
    error: type[Exception],
    what: str,
    file_size: int | None = None,
) -> None:
    """Tensors whose logical size (numel x element size) exceeds the storage they cover
    (stride-0 ``expand``, overlapping ``as_strided``) cost their logical size once any
    check materializes them (several times over: copies, float64 reductions); refuse
    when that extra does not fit the free memory, or when a file declares more than a
    zip may (MAX_INFLATION x its size above INFLATION_FLOOR): torch.save never writes
    such views of its own accord."""
    import torch

    extra = 0
    worst: tuple[int, str, Any] | None = None
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_meta:
            continue
        more = overlapping_bytes(t)
        if more > 0:
            extra += more
            if worst is None or more > worst[0]:
                worst = (more, name, t)
    if worst is None:
        return
    _, name, t = worst
    if file_size is not None and extra > max(INFLATION_FLOOR, MAX_INFLATION * file_size):
        raise error(
            f"{where}: {what} {name!r} is a {'x'.join(map(str, t.shape))} view of "
            f"{size_text(_span(t))} of storage (strides {list(t.stride())}): the "
            f"{size_text(file_size)} file expands to {size_text(extra)} more, beyond "
            f"{MAX_INFLATION}x its size; save the tensors contiguous (.contiguous()) if "
            "they are meant to be that large"
        )
    free = memory.available()
    if free is None or extra <= free:
        return
    raise error(
        f"{where}: {what} {name!r} is a {'x'.join(map(str, t.shape))} view of "
        f"{size_text(_span(t))} of storage (strides {list(t.stride())}); materializing the "
        f"expanded tensors needs {size_text(extra)}, more than the {size_text(free)} of free "
        "memory; save them contiguous (.contiguous()) or smaller"
    )


# --- tensors nnhealth cannot compute on ------------------------------------------------------


def unusable(t: Any, quantized_ok: bool = False) -> str | None:
    """Why nnhealth cannot compute on this tensor and what to do (sparse, nested, meta,
    quantized); None when it can."""
    import torch

    sparse = {
        torch.sparse_coo: "sparse COO",
        torch.sparse_csr: "sparse CSR",
        torch.sparse_csc: "sparse CSC",
        torch.sparse_bsr: "sparse BSR",
        torch.sparse_bsc: "sparse BSC",
    }
    if t.layout in sparse:
        return f"a {sparse[t.layout]} tensor; nnhealth needs dense tensors: save tensor.to_dense()"
    if t.is_nested:
        return (
            "a nested (ragged) tensor; pad it to a dense one "
            "(torch.nested.to_padded_tensor(t, 0.0)) and save that"
        )
    if t.layout != torch.strided:
        return f"a tensor with layout {t.layout}; save tensor.to_dense()"
    if t.is_meta:
        return (
            "a tensor on the meta device, which holds no values (built under "
            "torch.device('meta')?); save the real tensor"
        )
    if t.is_quantized and not quantized_ok:
        return f"a quantized ({t.dtype}) tensor; save tensor.dequantize()"
    return None


def check_usable(
    named: Iterable[tuple[str, Any]], where: str, error: type[Exception], what: str
) -> None:
    """Weights: refuse sparse, nested and meta tensors (quantized ones are read)."""
    for name, t in named:
        why = unusable(t, quantized_ok=True)
        if why:
            raise error(f"{where}: {what} {name!r} is {why}")
