"""Resolve MODEL: an entry point, a torch.save file, a state_dict, or TorchScript.

Safe by default: a pickled module loads with ``weights_only=True`` and an allowlist of
``torch.nn`` classes; anything else is refused with the list of what it needs, unless
the user said ``--trust``. Importing an entry point the user named is their choice.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnhealth._util import first_line
from nnhealth.errors import LoadError, UsageError
from nnhealth.loading import detect

# Activation functions a pickled module may reference (e.g. TransformerEncoderLayer
# stores F.relu). Pure functions of tensors: harmless to reference while unpickling.
_SAFE_FUNCTIONS = (
    "relu",
    "relu6",
    "gelu",
    "silu",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "elu",
    "selu",
    "celu",
    "mish",
    "softplus",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "glu",
    "logsigmoid",
    "softsign",
    "tanhshrink",
)


@dataclass
class LoadedModel:
    model: nn.Module | None
    format: str
    source: str
    state: dict[str, torch.Tensor] | None = None
    example: Any = None
    loss_fn: Callable | None = None
    notes: list[str] = field(default_factory=list)


@cache
def nn_allowlist() -> dict[str, Any]:
    """Qualified name -> object for every nn.Module class defined under torch.nn.modules."""
    import torch.nn.functional as F

    allowed: dict[str, Any] = {}
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("torch.nn.modules") or mod is None:
            continue
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == modname:
                allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    # weight_norm / spectral_norm keep their reparametrization as forward pre-hooks: torch
    # objects whose calls are tensor arithmetic on the module's own parameters
    from torch.nn.modules.module import _WrappedHook

    # the modules, not the functions of the same name that torch.nn.utils exports
    sn = importlib.import_module("torch.nn.utils.spectral_norm")
    wn = importlib.import_module("torch.nn.utils.weight_norm")

    for obj in (
        wn.WeightNorm,
        sn.SpectralNorm,
        sn.SpectralNormStateDictHook,
        sn.SpectralNormLoadStateDictPreHook,
        _WrappedHook,
    ):
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    for fname in _SAFE_FUNCTIONS:
        fn = getattr(F, fname, None)
        if fn is not None:
            allowed[f"torch.nn.functional.{fname}"] = fn
            # some are C builtins pickled under their own module (torch._C._nn.gelu)
            allowed[f"{getattr(fn, '__module__', None) or 'torch.nn.functional'}.{fn.__name__}"] = (
                fn
            )
    return allowed


@contextlib.contextmanager
def _importable_from(directory: str, argv0: str = "nnhealth") -> Iterator[None]:
    """Put ``directory`` first on sys.path, write no bytecode next to user files, and
    hide nnhealth's own command line from user code that parses sys.argv on import."""
    old_path, old_bytecode, old_argv = list(sys.path), sys.dont_write_bytecode, sys.argv
    sys.path.insert(0, directory)
    sys.dont_write_bytecode = True
    sys.argv = [argv0]
    try:
        yield
    finally:
        sys.path[:] = old_path
        sys.dont_write_bytecode = old_bytecode
        sys.argv = old_argv


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 (a legacy, non-zip format: found while loading instead)
        return []


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


_MARK = object()


def _module_class_calls(pickle_bytes: bytes) -> list[str]:
    """Allowlisted classes the pickle *calls* (REDUCE) rather than re-creates (NEWOBJ).

    torch.save pickles a module as NEWOBJ (cls.__new__) plus BUILD (its state); calling
    the class, Linear(50000, 50000), only happens in a crafted file and allocates at
    will. A symbolic run of the opcodes finds the callable under each REDUCE.
    """
    classes = {n for n, obj in nn_allowlist().items() if isinstance(obj, type)}
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    called: list[str] = []
    for op, arg, _ in pickletools.genops(pickle_bytes):
        name = op.name
        if name in ("GLOBAL", "STACK_GLOBAL"):
            if name == "STACK_GLOBAL":
                del stack[-2:]
                arg = "?"
            stack.append(("global", arg.replace(" ", ".")))
            continue
        if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1] if stack else None
            continue
        if name in ("BINGET", "LONG_BINGET", "GET"):
            stack.append(memo.get(arg))
            continue
        if name == "REDUCE" and len(stack) >= 2:
            func = stack[-2]
            if isinstance(func, tuple) and func[0] == "global" and func[1] in classes:
                called.append(func[1])
        before = op.stack_before
        if pickletools.markobject in before:
            while stack and stack.pop() is not _MARK:
                pass
            for _ in range(before.index(pickletools.markobject)):
                if stack:
                    stack.pop()
        else:
            for _ in before:
                if stack:
                    stack.pop()
        for item in op.stack_after:
            stack.append(_MARK if item is pickletools.markobject else None)
    return called


def _refuse_class_calls(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            data = zf.read(member) if member else b""
        called = _module_class_calls(data)
    except (zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError):
        return  # torch.load reports unreadable files itself
    if called:
        raise LoadError(
            f"{path}: the pickle calls {', '.join(sorted(set(called)))} with its own arguments "
            "(torch.save never does: it re-creates modules without calling them); refusing "
            "to load it. If you trust the file, rerun with --trust"
        )


def _load_pickle(path: Path, trust: bool) -> tuple[Any, str]:
    allow = nn_allowlist()
    if not trust:
        _refuse_class_calls(path)
    needed = _unsafe_globals(path)
    refused = [n for n in needed if n not in allow]
    if refused and not trust:
        raise _refusal(path, refused)
    try:
        if trust:
            with _importable_from(os.getcwd()):
                obj = torch.load(path, map_location="cpu", weights_only=False)
            return obj, "trusted (--trust)"
        granted = [n for n in needed if n in allow]
        # The legacy (non-zip) format cannot be listed up front: each refused global
        # shows up as an UnpicklingError; grant it if it is on the allowlist and retry.
        for _ in range(len(allow) + 1):
            try:
                with torch.serialization.safe_globals([allow[n] for n in granted]):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
                break
            except pickle.UnpicklingError as exc:
                found = [n for n in _GLOBAL_RE.findall(str(exc)) if n not in granted]
                if not found:
                    raise
                if any(n not in allow for n in found):
                    raise _refusal(path, [n for n in found if n not in allow]) from exc
                granted += found
        return obj, ("torch.nn classes, allowlisted" if granted else "weights only")
    except pickle.UnpicklingError as exc:
        raise LoadError(
            f"{path}: cannot be loaded safely with weights_only=True ({_unpickler_reason(exc)}). "
            "If you trust the file, rerun with --trust (or NNHEALTH_TRUST=1); or re-save it "
            "with torch.save from a recent PyTorch"
        ) from exc
    except (ModuleNotFoundError, AttributeError) as exc:
        raise LoadError(
            f"{path}: the pickle needs code that is not importable ({first_line(exc)}); "
            "run from the directory that holds the model's package, or use an entry point"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LoadError(
            f"{path}: cannot read this torch.save file ({first_line(exc)}); it looks "
            "truncated or corrupt: save it again"
        ) from exc


def _unpickler_reason(exc: BaseException) -> str:
    """The one informative sentence of torch's long weights-only error."""
    text = " ".join(str(exc).split())
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
        text = text.split(" Check the documentation", 1)[0].strip()
    return text[:200] or type(exc).__name__


def _refusal(path: Path, refused: list[str]) -> LoadError:
    shown = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
    return LoadError(
        f"{path}: refusing to unpickle classes or functions outside torch.nn ({shown}): loading them runs "
        "code from the file. If you trust it, rerun with --trust (or NNHEALTH_TRUST=1) from "
        "a directory where those modules import; or scan an entry point "
        "(pkg.module:factory --weights FILE)"
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def unwrap_state_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from a plain dict, a Lightning ``.ckpt`` or a training checkpoint."""
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(map(str, list(obj)[:8]))
        raise LoadError(
            f"{where}: a dict with keys [{keys}] but no state_dict or model in it; save "
            "the model (torch.save(model)) or its state_dict"
        )
    raise LoadError(f"{where}: holds a {type(obj).__name__}, not a model or a state_dict")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise LoadError(
            f"{path}: a safetensors file; install the extra to read it: "
            "pip install 'nnhealth[safetensors]'"
        ) from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise LoadError(f"{path}: cannot read safetensors ({first_line(exc)})") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from FILE (torch.save, Lightning .ckpt, safetensors), never unpickling code."""
    if not path.is_file():
        raise LoadError(f"{path}: no such weights file")
    kind = detect.sniff(path)
    if kind == detect.SAFETENSORS:
        return _read_safetensors(path)
    if kind in (detect.CORRUPT_ZIP, detect.TRUNCATED_ZIP):
        raise LoadError(f"{path}: a truncated or corrupt archive; save the weights again")
    if kind != detect.TORCH_PICKLE:
        raise LoadError(
            f"{path}: not a weights file ({detect.DESCRIPTIONS.get(kind, kind)}); expected "
            "a torch.save state_dict, a Lightning .ckpt or a safetensors file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoadError(
            f"{path}: holds more than weights ({_unpickler_reason(exc)}); save model.state_dict()"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read ({first_line(exc)}); truncated or corrupt?") from exc
    return unwrap_state_dict(obj, str(path))


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` strictly, trying a common wrapper prefix (``model.``, ``module.``)."""
    expected = set(model.state_dict())
    candidates = [state]
    for prefix in ("model.", "module.", "net.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            candidates.append({k[len(prefix) :]: v for k, v in state.items()})
    for cand in candidates:
        if set(cand) == expected:
            try:
                model.load_state_dict(cand, strict=True)
            except RuntimeError as exc:
                raise LoadError(f"{where}: does not fit the model ({first_line(exc)})") from exc
            return
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    raise LoadError(
        f"{where}: does not fit the model: {len(missing)} missing keys "
        f"({', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
        f"({', '.join(unexpected[:3]) or '-'})"
    )


def _entry_point(spec: str) -> tuple[Any, str]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"{spec}: an entry point is pkg.module:factory or path/file.py:factory")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise LoadError(f"{spec}: no such file {target}")
            with _importable_from(str(file.resolve().parent), str(file)):
                modspec = importlib.util.spec_from_file_location(
                    f"_nnhealth_entry_{file.stem}", file
                )
                module = importlib.util.module_from_spec(modspec)
                # registered, as an import would: inspect (the report's source locations)
                # and dataclasses look classes' modules up in sys.modules
                sys.modules[modspec.name] = module
                modspec.loader.exec_module(module)
        else:
            with _importable_from(os.getcwd()):
                module = importlib.import_module(target)
    except LoadError:
        raise
    except (Exception, SystemExit) as exc:  # user code: anything but Ctrl-C is its failure
        raise LoadError(
            f"{spec}: importing {target} raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{spec}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj, target
    if not callable(obj):
        raise LoadError(f"{spec}: {attr} is neither a module nor a callable factory")
    try:
        with _importable_from(os.getcwd()):
            return obj(), target
    except (Exception, SystemExit) as exc:
        raise LoadError(
            f"{spec}: the factory raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _from_factory_result(result: Any, spec: str) -> LoadedModel:
    example = loss_fn = None
    model = result
    if isinstance(result, dict):
        model = result.get("model")
        example = result.get("batch")
        loss_fn = result.get("loss")
    elif isinstance(result, (tuple, list)):
        if not result or not isinstance(result[0], nn.Module) or len(result) > 3:
            raise LoadError(
                f"{spec}: the factory must return a module, (module, batch) or "
                "(module, batch, loss_fn)"
            )
        model = result[0]
        example = result[1] if len(result) > 1 else None
        loss_fn = result[2] if len(result) > 2 else None
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec}: the factory returned a {type(model).__name__}, not an nn.Module")
    if loss_fn is not None and not callable(loss_fn):
        raise LoadError(f"{spec}: the factory's loss is not callable")
    return LoadedModel(
        model=model, format="entry point", source=spec, example=example, loss_fn=loss_fn
    )


def is_entry_point(spec: str) -> bool:
    return (
        ":" in spec
        and not Path(spec).exists()
        and bool(re.fullmatch(r"[^:]+:[A-Za-z_][\w.]*", spec))
    )


def load_model(spec: str, *, trust: bool = False, weights: str | None = None) -> LoadedModel:
    """Resolve MODEL as described in the module docstring. Raises LoadError/UsageError."""
    if is_entry_point(spec):
        if weights and not Path(weights).exists() and is_entry_point(weights):
            raise UsageError(f"--arch {spec}: MODEL {weights} must be a weights file")
        result, _ = _entry_point(spec)
        loaded = _from_factory_result(result, spec)
        if weights:
            apply_weights(loaded.model, read_weights(Path(weights)), weights)
            loaded.notes.append(f"weights from {weights}")
        return loaded
    path = Path(spec)
    if not path.exists():
        raise LoadError(
            f"{spec}: no such file (for an entry point write pkg.module:factory or file.py:factory)"
        )
    if path.is_dir():
        raise LoadError(f"{spec}: is a directory; give a model file or an entry point")
    if weights:
        raise UsageError("--weights applies to entry points (pkg.module:factory); MODEL is a file")
    try:
        kind = detect.sniff(path)
    except OSError as exc:
        raise LoadError(f"{spec}: cannot read ({exc.strerror})") from exc
    if kind == detect.TORCH_PICKLE:
        obj, how = _load_pickle(path, trust)
        if isinstance(obj, nn.Module):
            return LoadedModel(model=obj, format=f"torch.save module ({how})", source=spec)
        if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
            return LoadedModel(model=obj["model"], format=f"torch.save module ({how})", source=spec)
        state = unwrap_state_dict(obj, spec)
        return LoadedModel(model=None, format="state_dict", source=spec, state=state)
    if kind == detect.SAFETENSORS:
        return LoadedModel(
            model=None, format="safetensors state_dict", source=spec, state=_read_safetensors(path)
        )
    if kind == detect.TORCHSCRIPT:
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated; its files still exist
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise LoadError(f"{spec}: cannot load TorchScript ({first_line(exc)})") from exc
        return LoadedModel(model=model, format="TorchScript", source=spec)
    if kind == detect.EXPORT:
        raise LoadError(
            f"{spec}: a torch.export archive; nnhealth cannot scan those yet (export keeps "
            "aten-level graphs without module activations): scan the eager model through "
            "an entry point (pkg.module:factory)"
        )
    if kind in (detect.NPY, detect.NPZ):
        raise LoadError(f"{spec}: a NumPy array, not a model (did you mean --data {spec}?)")
    if kind == detect.CORRUPT_ZIP:
        raise LoadError(
            f"{spec}: corrupt: a checksum inside the archive does not match its data (a "
            "damaged copy?); copy or save the model again"
        )
    if kind == detect.TRUNCATED_ZIP:
        raise LoadError(
            f"{spec}: starts like a zip archive (torch.save) but is truncated or corrupt; "
            "save the model again"
        )
    raise LoadError(
        f"{spec}: not a model format nnhealth reads (torch.save, TorchScript, safetensors) "
        "or an entry point (pkg.module:factory)"
    )
