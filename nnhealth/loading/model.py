"""Resolve MODEL: an entry point, a torch.save file, a state_dict, or TorchScript.

Safe by default: a pickled module loads with ``weights_only=True`` and an allowlist of
``torch.nn`` classes; anything else is refused with the list of what it needs, unless
the user said ``--trust``. Importing an entry point the user named is their choice.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnhealth._util import ENTRY_POINT, escaped, first_line, regular_file
from nnhealth.errors import LoadError, UsageError, flag, report_text
from nnhealth.loading import detect, limits

if TYPE_CHECKING:
    from nnhealth.loading.training_state import SavedOptimizer

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
    optimizer: SavedOptimizer | None = None  # the optimizer state saved with the weights


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


_TRUST_HINT = f"If you trust the file, rerun with {flag('trust')} (or NNHEALTH_TRUST=1)"


def _allowlisted(calls: list[str]) -> list[str]:
    """The allowlisted classes and functions among a pickle's calls (REDUCE, INST, OBJ):
    torch.save re-creates modules (NEWOBJ + BUILD) and never calls them; calling
    Linear(50000, 50000), or an activation on a stride-0 view, only happens in a crafted
    file and allocates at will. ``limits.walk_pickle`` finds the calls without running
    the pickle."""
    allow = nn_allowlist()
    return [name for name in calls if name in allow]


def _refuse_class_calls(path: Path, facts: limits.PickleFacts) -> None:
    called = _allowlisted(facts.calls)
    if called:
        raise LoadError(
            f"{path}: the pickle calls {', '.join(sorted(set(called)))} with its own arguments "
            "(torch.save never does: it re-creates modules without calling them); refusing "
            f"to load it. {_TRUST_HINT}"
        )


_MAX_MODULE_DEPTH = 100  # submodule nesting (real models: under 20; torch recurses per level)


def _check_module(model: nn.Module, where: str) -> None:
    """A pickled module's skeleton, before anything walks it: ``_modules``,
    ``_parameters`` and ``_buffers`` are dicts of modules / tensors, without cycles and
    nested no deeper than ``_MAX_MODULE_DEPTH`` (torch's own walks recurse once per
    level). A crafted or damaged file can break any of these, and every later step would
    crash on it."""
    # iterative depth-first walk; "open" modules are on the current path (a cycle)
    stack: list[tuple[nn.Module, int, bool]] = [(model, 0, False)]
    open_: set[int] = set()
    done: set[int] = set()
    while stack:
        module, depth, leaving = stack.pop()
        if leaving:
            open_.discard(id(module))
            done.add(id(module))
            continue
        if id(module) in open_:
            raise LoadError(
                f"{where}: a {type(module).__name__} module contains itself (a cycle of "
                "submodules: a damaged or crafted file); save the model again"
            )
        if id(module) in done:
            continue
        if depth > _MAX_MODULE_DEPTH:
            raise LoadError(
                f"{where}: submodules nested more than {_MAX_MODULE_DEPTH} levels deep (a "
                "damaged or crafted file); save the model again, or use an entry point"
            )
        state = vars(module)
        for attr, kind in (
            ("_modules", nn.Module),
            ("_parameters", torch.Tensor),
            ("_buffers", torch.Tensor),
        ):
            table = state.get(attr)
            if not isinstance(table, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, kind)) for k, v in table.items()
            ):
                raise LoadError(
                    f"{where}: a {type(module).__name__} module whose {attr} is malformed (a "
                    "damaged or crafted file); save the model again"
                )
        open_.add(id(module))
        stack.append((module, depth, True))
        stack.extend(
            (child, depth + 1, False) for child in state["_modules"].values() if child is not None
        )


def _materialize_views(model: nn.Module) -> int:
    """Make parameters and buffers that overlap themselves (stride-0 ``expand`` views,
    already checked to fit in memory) contiguous: the scan writes into them (restoring
    buffers, what-if steps), which torch refuses on overlapping memory. Tied tensors stay
    tied. Returns how many were materialized."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.layout != torch.strided or t.is_meta or t.numel() < 2:
                    continue
                if limits.overlapping_bytes(t) <= 0 and id(t) not in done:
                    continue
                if isinstance(t, nn.Parameter):
                    if id(t) not in done:
                        t.data = t.data.contiguous()
                        done[id(t)] = t
                else:
                    if id(t) not in done:
                        done[id(t)] = t.contiguous()
                    table[name] = done[id(t)]
    return len(done)


def _check_weights(named: Any, where: str, what: str) -> None:
    """Tensors the weight checks can compute on, and whose views fit in memory."""
    named = list(named)
    limits.check_usable(named, where, LoadError, what)
    try:
        size = Path(where).stat().st_size
    except (OSError, ValueError):
        size = None
    limits.check_tensors(named, where, LoadError, what, size)


def _module_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _load_pickle(path: Path, trust: bool) -> tuple[Any, str]:
    """The object a torch.save file holds, and how it was loaded: with ``trust`` by
    torch.load itself, otherwise with weights_only=True and the nn allowlist, after the
    walk of its pickles found no call to refuse."""
    allow = nn_allowlist()
    facts = limits.torch_pickles(path, str(path), LoadError, trusted=trust, hint=_TRUST_HINT)
    if not trust:
        _refuse_class_calls(path, facts)
    needed = _unsafe_globals(path)
    refused = [n for n in needed if n not in allow]
    if refused and not trust:
        raise _refusal(path, refused)
    try:
        if trust:
            with _importable_from(os.getcwd()), limits.quiet_readers():
                obj = torch.load(path, map_location="cpu", weights_only=False)
            return obj, "trusted (--trust)"
        obj, granted = _load_allowlisted(path, allow, [n for n in needed if n in allow])
        return obj, ("torch.nn classes, allowlisted" if granted else "weights only")
    except LoadError:
        raise
    except (Exception, SystemExit) as exc:  # torch.load on a damaged file raises anything
        raise _load_failure(path, exc) from exc


def _weights_only(path: Path, allow: dict[str, Any], granted: list[str]) -> Any:
    with (
        torch.serialization.safe_globals([allow[n] for n in granted]),
        limits.quiet_readers(),
    ):
        return torch.load(path, map_location="cpu", weights_only=True)


def _load_allowlisted(
    path: Path, allow: dict[str, Any], granted: list[str]
) -> tuple[Any, list[str]]:
    """torch.load with weights_only=True and the ``granted`` allowlisted globals, and the
    globals granted in the end. The legacy (non-zip) format cannot be listed up front:
    each refused global shows up as an UnpicklingError; grant it if it is on the
    allowlist and retry."""
    for _ in range(len(allow)):  # each retry grants one more: at most all of them
        try:
            return _weights_only(path, allow, granted), granted
        except pickle.UnpicklingError as exc:
            found = [n for n in _GLOBAL_RE.findall(str(exc)) if n not in granted]
            if not found:
                raise
            if any(n not in allow for n in found):
                raise _refusal(path, [n for n in found if n not in allow]) from exc
            granted = granted + found
    return _weights_only(path, allow, granted), granted


def _load_failure(path: Path, exc: BaseException) -> LoadError:
    """The one line for an exception torch.load raised on ``path``."""
    if isinstance(exc, pickle.UnpicklingError):
        return LoadError(
            f"{path}: cannot be loaded safely with weights_only=True ({_unpickler_reason(exc)}). "
            f"{_TRUST_HINT}; or re-save it with torch.save from a recent PyTorch"
        )
    if isinstance(exc, (ModuleNotFoundError, AttributeError)):
        return LoadError(
            f"{path}: the pickle needs code that is not importable ({first_line(exc)}); "
            "run from the directory that holds the model's package, or use an entry point"
        )
    return _unreadable(path, exc)


def _unreadable(path: Path | str, exc: BaseException) -> LoadError:
    if isinstance(exc, RecursionError):
        return LoadError(
            f"{path}: its pickle nests objects too deeply to read (a damaged or hostile "
            "file); save it again"
        )
    if isinstance(exc, MemoryError):
        return LoadError(
            f"{path}: ran out of memory while loading it; free memory or save a smaller model"
        )
    if isinstance(exc, SystemExit):
        reason = escaped(exc)  # code run with --trust called sys.exit
    elif isinstance(exc, (RuntimeError, EOFError, OSError, ValueError)):
        reason = first_line(exc)
    else:
        reason = f"{type(exc).__name__}: {first_line(exc)}"
    return LoadError(
        f"{path}: cannot read this torch.save file ({reason}); it looks truncated or "
        "corrupt: save it again"
    )


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
        f"{path}: refusing to unpickle classes or functions outside torch.nn ({shown}): "
        "loading them runs code from the file. If you trust it, rerun with "
        f"{flag('trust')} (or NNHEALTH_TRUST=1) from a directory where those modules "
        f"import; or scan an entry point (pkg.module:factory {flag('weights')} FILE)"
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
    # safetensors checks that the header's offsets cover the file exactly: what it
    # copies out is the file's size
    limits.fits_memory(
        path.stat().st_size, "loading its tensors", str(path), LoadError, "free memory"
    )
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # its errors, RecursionError, MemoryError
        raise LoadError(f"{path}: cannot read safetensors ({first_line(exc)})") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from FILE (torch.save, Lightning .ckpt, safetensors), never unpickling code."""
    return read_checkpoint(path, [])[0]


def read_checkpoint(
    path: Path, notes: list[str]
) -> tuple[dict[str, torch.Tensor], SavedOptimizer | None]:
    """A state_dict from FILE (torch.save, Lightning .ckpt, safetensors) or a Hugging Face
    Trainer checkpoint folder, and the optimizer state saved with it (or None), never
    unpickling code. An optimizer state that cannot be read is left out, with a note."""
    from nnhealth.loading import training_state

    if not path.exists():
        raise LoadError(f"{path}: no such weights file")
    if path.is_dir():
        return _read_trainer_folder(path, notes)
    regular_file(path, "weights", LoadError)  # a FIFO blocks, /dev/zero never ends
    kind = _sniff(path, str(path), LoadError)
    if kind == detect.SAFETENSORS:
        state = _read_safetensors(path)
        _check_weights(state.items(), str(path), "tensor")
        return state, None
    if kind == detect.BAD_SAFETENSORS:
        raise LoadError(detect.malformed_safetensors(str(path)))
    if kind in (detect.CORRUPT_ZIP, detect.TRUNCATED_ZIP):
        raise LoadError(f"{path}: a truncated or corrupt archive; save the weights again")
    if kind != detect.TORCH_PICKLE:
        raise LoadError(
            f"{path}: not a weights file ({detect.DESCRIPTIONS.get(kind, kind)}); expected "
            "a torch.save state_dict, a Lightning .ckpt or a safetensors file"
        )
    limits.torch_pickles(
        path, str(path), LoadError, trusted=False, hint="save model.state_dict() with torch.save"
    )
    try:
        with limits.quiet_readers():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LoadError(
            f"{path}: holds more than weights ({_unpickler_reason(exc)}); save model.state_dict()"
        ) from exc
    except (Exception, SystemExit) as exc:  # torch.load on a damaged file raises anything
        raise _unreadable(path, exc) from exc
    optimizer = _optional(lambda: training_state.find_saved_optimizer(obj, str(path)), notes)
    _not_only_an_optimizer(obj, optimizer, str(path))
    state = unwrap_state_dict(obj, str(path))
    _check_weights(state.items(), str(path), "tensor")
    return state, optimizer


def _optional(read: Callable[[], SavedOptimizer | None], notes: list[str]) -> SavedOptimizer | None:
    """The optimizer state saved beside the weights: one that cannot be read does not
    stop the scan (the weights are what MODEL asked for); say why it was left out."""
    try:
        return read()
    except LoadError as exc:
        notes.append(report_text(f"optimizer state not used: {exc.message}"))
        return None


def _not_only_an_optimizer(obj: Any, optimizer: SavedOptimizer | None, where: str) -> None:
    if optimizer is not None and optimizer.state_dict is obj:
        raise LoadError(
            f"{where}: an optimizer state_dict, not model weights; give it as "
            f"{flag('optimizer_state')} {where}, with the model or its weights"
        )


def _read_trainer_folder(
    path: Path, notes: list[str]
) -> tuple[dict[str, torch.Tensor], SavedOptimizer | None]:
    """A Hugging Face Trainer checkpoint folder: its weights file, and its optimizer.pt
    (with scheduler.pt) when there is one. Other directories are refused."""
    from nnhealth.loading import training_state

    files = [path / name for name in training_state.TRAINER_WEIGHTS if (path / name).is_file()]
    if not files:
        sharded = any(path.glob("*.index.json"))
        raise LoadError(
            f"{path}: is a directory without {' or '.join(training_state.TRAINER_WEIGHTS)}"
            + (" (sharded checkpoints are not read)" if sharded else "")
            + "; give a weights file or a Hugging Face Trainer checkpoint folder"
        )
    state, _ = read_checkpoint(files[0], [])
    if not (path / training_state.TRAINER_OPTIMIZER).exists():
        return state, None
    return state, _optional(lambda: training_state.read_optimizer_state(path), notes)


def _sniff(path: Path, where: str, error: type[Exception]) -> str:
    try:
        return detect.sniff(path, error)
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or first_line(exc)})") from exc


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
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # user code: anything but Ctrl-C is its failure
        raise LoadError(f"{spec}: importing {target} {escaped(exc)}") from exc
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
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the factory: user code, sys.exit included
        raise LoadError(f"{spec}: the factory {escaped(exc)}") from exc


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
    return ":" in spec and not Path(spec).exists() and bool(ENTRY_POINT.fullmatch(spec))


def load_model(spec: str, *, trust: bool = False, weights: str | None = None) -> LoadedModel:
    """Resolve MODEL as described in the module docstring. Raises LoadError/UsageError."""
    if is_entry_point(spec):
        return _load_entry_point(spec, weights)
    path = _model_file(spec, weights)
    kind = _sniff(path, spec, LoadError)
    if kind == detect.TORCH_PICKLE:
        return _from_torch_save(path, spec, trust)
    if kind == detect.SAFETENSORS:
        state = _read_safetensors(path)
        _check_weights(state.items(), spec, "tensor")
        return LoadedModel(model=None, format="safetensors state_dict", source=spec, state=state)
    if kind == detect.TORCHSCRIPT:
        return _from_torchscript(path, spec, trust)
    if kind == detect.UNKNOWN:
        source = _python_factories(path, spec)
        if source is not None:
            raise source
    raise _not_a_model(kind, spec)


def _load_entry_point(spec: str, weights: str | None) -> LoadedModel:
    if weights and not Path(weights).exists() and is_entry_point(weights):
        raise UsageError(f"{flag('arch')} {spec}: MODEL {weights} must be a weights file")
    result, _ = _entry_point(spec)
    loaded = _from_factory_result(result, spec)
    if weights:
        state, loaded.optimizer = read_checkpoint(Path(weights), loaded.notes)
        apply_weights(loaded.model, state, weights)
        loaded.notes.append(f"weights from {weights}")
    return loaded


def _model_file(spec: str, weights: str | None) -> Path:
    """MODEL as a regular file to read (not an entry point)."""
    path = Path(spec)
    if not path.exists():
        raise LoadError(
            f"{spec}: no such file (for an entry point write pkg.module:factory or file.py:factory)"
        )
    if path.is_dir():
        raise LoadError(f"{spec}: is a directory; give a model file or an entry point")
    regular_file(path, "model", LoadError)  # a FIFO blocks, /dev/zero never ends
    if weights:
        raise UsageError(
            f"{flag('weights')} applies to entry points (pkg.module:factory); MODEL is a file"
        )
    return path


def _from_torch_save(path: Path, spec: str, trust: bool) -> LoadedModel:
    """A pickled module (its skeleton and tensors checked), or a state_dict."""
    from nnhealth.loading.training_state import find_saved_optimizer

    obj, how = _load_pickle(path, trust)
    notes: list[str] = []
    optimizer = _optional(lambda: find_saved_optimizer(obj, spec), notes)
    _not_only_an_optimizer(obj, optimizer, spec)
    if isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]
    if not isinstance(obj, nn.Module):
        state = unwrap_state_dict(obj, spec)
        _check_weights(state.items(), spec, "tensor")
        return LoadedModel(
            model=None,
            format="state_dict",
            source=spec,
            state=state,
            notes=notes,
            optimizer=optimizer,
        )
    _check_module(obj, spec)
    _check_weights(_module_tensors(obj), spec, "parameter or buffer")
    loaded = LoadedModel(
        model=obj,
        format=f"torch.save module ({how})",
        source=spec,
        notes=notes,
        optimizer=optimizer,
    )
    views = _materialize_views(obj)
    if views:
        loaded.notes.append(f"{views} expanded (stride-0) parameters or buffers made contiguous")
    return loaded


def _from_torchscript(path: Path, spec: str, trust: bool) -> LoadedModel:
    if not trust:
        # TorchScript is code: its forward or __setstate__ may call torch.from_file
        # (which creates and writes files), torch.save, or other I/O ops, and
        # torch.jit.load runs __setstate__ while loading
        raise LoadError(
            f"{spec}: a TorchScript archive is code that can read and write files (e.g. "
            "torch.from_file), run while loading and scanning; refusing to load it. If "
            f"you trust it, rerun with {flag('trust')} (or NNHEALTH_TRUST=1); or scan the "
            "Python model through an entry point (pkg.module:factory)"
        )
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; its files still exist
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14's wording
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise LoadError(f"{spec}: cannot load TorchScript ({first_line(exc)})") from exc
    return LoadedModel(model=model, format="TorchScript", source=spec)


def _not_a_model(kind: str, spec: str) -> LoadError:
    """Why a file of format ``kind`` (detect's names) is not a model nnhealth reads."""
    if kind == detect.BAD_SAFETENSORS:
        return LoadError(detect.malformed_safetensors(spec))
    if kind == detect.EXPORT:
        return LoadError(
            f"{spec}: a torch.export archive; nnhealth cannot scan those yet (export keeps "
            "aten-level graphs without module activations): scan the eager model through "
            "an entry point (pkg.module:factory)"
        )
    if kind in (detect.NPY, detect.NPZ):
        return LoadError(
            f"{spec}: a NumPy array, not a model (did you mean {flag('data')} {spec}?)"
        )
    if kind == detect.CORRUPT_ZIP:
        return LoadError(
            f"{spec}: corrupt: a checksum inside the archive does not match its data (a "
            "damaged copy?); copy or save the model again"
        )
    if kind == detect.TRUNCATED_ZIP:
        return LoadError(
            f"{spec}: starts like a zip archive (torch.save) but is truncated or corrupt; "
            "save the model again"
        )
    return LoadError(
        f"{spec}: not a model format nnhealth reads (torch.save, TorchScript, safetensors) "
        "or an entry point (pkg.module:factory)"
    )


_MAX_SOURCE = 10 * 2**20  # bytes of Python source parsed to list its factories
_SHOWN_FACTORIES = 8


def _python_factories(path: Path, spec: str) -> UsageError | None:
    """For Python source given as MODEL without ``:factory``: the error that lists what
    it could name, read with ``ast`` (nothing in the file runs). None when the file is
    not Python source."""
    try:
        if path.stat().st_size > _MAX_SOURCE:
            return None
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        return None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    if path.suffix != ".py" and not defs:
        return None  # text that happens to parse as Python ("hello")
    modules = _module_classes(tree)
    ready, needy = [], []
    for node in defs:
        if node.name.startswith("_") or (
            isinstance(node, ast.ClassDef) and node.name not in modules
        ):
            continue
        signature, required = _signature(node)
        (needy if required else ready).append(signature)
    head = f"{spec}: Python source, not a saved model"
    if ready:
        return UsageError(f"{head}; name the factory to call as {spec}:NAME, one of {_few(ready)}")
    found = f" (found {_few(needy)}, which need arguments)" if needy else ""
    return UsageError(
        f"{head}, and it defines no function or nn.Module class that can be called without "
        f"arguments{found}; add one that returns the model and scan {spec}:NAME"
    )


def _few(items: list[str]) -> str:
    more = len(items) - _SHOWN_FACTORIES
    return ", ".join(items[:_SHOWN_FACTORIES]) + (f" and {more} more" if more > 0 else "")


def _dotted(node: ast.expr) -> str:
    return ast.unparse(node) if isinstance(node, (ast.Name, ast.Attribute)) else ""


def _module_classes(tree: ast.Module) -> set[str]:
    """Top-level classes that derive from nn.Module, as far as the source tells: a base
    from torch.nn (``nn.Module``, ``torch.nn.Sequential``, a name imported from
    torch.nn), one named ``*Module`` (LightningModule), or another such class here."""
    from_nn = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.nn")
        for alias in node.names
    }
    classes = {
        n.name: [_dotted(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)
    }
    found: set[str] = set()

    def is_module(base: str) -> bool:
        return (
            base.startswith(("nn.", "torch.nn."))
            or base.split(".")[0] in from_nn
            or base.rpartition(".")[2].endswith("Module")
            or base in found
        )

    for _ in range(len(classes)):  # a class may derive from one defined after it
        grown = {name for name, bases in classes.items() if any(map(is_module, bases))}
        if grown == found:
            break
        found = grown
    return found


def _signature(node: ast.FunctionDef | ast.ClassDef) -> tuple[str, bool]:
    """``Net(width=64)`` (a class: its ``__init__`` without self) and whether a call
    needs arguments."""
    args = node.args if isinstance(node, ast.FunctionDef) else None
    if isinstance(node, ast.ClassDef):
        init = next(
            (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
            None,
        )
        if init is not None:
            args = copy_args(init.args)
    if args is None:
        return f"{node.name}()", False
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) > len(args.defaults) or any(d is None for d in args.kw_defaults)
    text = ast.unparse(args)
    text = text if len(text) <= 60 else text[:59] + "…"
    return f"{node.name}({text})", required


def copy_args(args: ast.arguments) -> ast.arguments:
    """``args`` without its first parameter (a method's self)."""
    positional = [*args.posonlyargs, *args.args][1:]
    posonly = max(0, len(args.posonlyargs) - 1)
    return ast.arguments(
        posonlyargs=positional[:posonly],
        args=positional[posonly:],
        vararg=args.vararg,
        kwonlyargs=args.kwonlyargs,
        kw_defaults=args.kw_defaults,
        kwarg=args.kwarg,
        defaults=args.defaults[-len(positional) :] if positional else [],
    )
