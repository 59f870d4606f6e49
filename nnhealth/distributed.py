"""One scan across the ranks of a torch.distributed job, as if one process had the
whole batch.

``torchrun --nproc_per_node=N -m nnhealth scan MODEL --data FILE`` (or
``nnhealth.scan`` called on every rank of a job that has a process group): each rank
runs the pass on its part of the batch (the CLI gives rank r examples
[r*n/N, (r+1)*n/N) of the file's batch; ``nnhealth.scan`` takes each rank's batch as its
own), and torch.distributed combines what the ranks saw:

- the loss is the mean over all examples: each rank's loss (a mean over its own
  examples) is weighted by its share n_r / n (LossResolver.weight) before any backward, so gradients summed
  over ranks (all_reduce) are the gradient of the whole batch's loss, exactly when the
  loss is a mean over examples;
- per-layer statistics are gathered and combined exactly from each rank's counts,
  means and centred sums of squares (Chan et al.'s pairwise formula), dead units by a
  logical or (ever active anywhere), saturation counts by a sum, per-unit extremes by
  min/max; the symmetry check's fingerprints are summed projections (equal units stay
  equal), and the values inside a unit's range are counted against each rank's own
  extremes (an approximation: a value at one rank's extreme is not counted);
- BatchNorm in train mode normalizes over the whole batch, not over each rank's part
  (torch's SyncBatchNorm, which runs only on accelerators): the batch mean and
  variance are all_reduced differentiably, so gradients and Hessian products see the
  same function one process would;
- Hessian-vector products are each rank's product of its weighted loss, summed over
  ranks: the whole batch's Hessian. Lanczos then runs identically on every rank (the
  same seeded start, the same reduced products).

Rank 0 alone writes the report; every rank exits with its exit code. A rank that fails
raises on its own line ("rank 1/2: ..."); the others stop at their next collective with
one line saying so, within the process group's timeout (NNHEALTH_DIST_TIMEOUT seconds,
300 by default) when the failed rank does not answer at all.

Sharded parameters (FSDP's fully_shard, DTensor) are refused with one line: the checks
read whole parameters and Lanczos needs products over all of them (see the README).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from nnhealth.errors import CaptureError, NnhealthError, UsageError, flag

if TYPE_CHECKING:
    from nnhealth.capture.stats import Capture, GateStats, SiteStats
    from nnhealth.loading.batch import Batch

DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other ranks


class DistributedError(NnhealthError):
    """The ranks of a distributed scan could not work together."""


def timeout() -> float:
    text = os.environ.get("NNHEALTH_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"NNHEALTH_DIST_TIMEOUT={text!r}: give a positive number of seconds")
    return value


@dataclass
class Ranks:
    """This process's place in the job, and its share of the batch once known."""

    rank: int
    world: int
    group: Any = None  # the process group (None: the default one)
    share: float = 1.0  # n_r / n: this rank's examples over all ranks'
    examples: int = 0  # n, over all ranks
    local: int = 0  # n_r

    @property
    def label(self) -> str:
        return f"rank {self.rank}/{self.world}"


_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("nnhealth_alone", default=False)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Scan as one process even inside a job (nnhealth.Monitor: each rank watches its
    own steps, and no rank waits on another's collective)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def current() -> Ranks | None:
    """The job this process is a rank of, when torch.distributed is initialized with
    more than one rank; None otherwise (a plain scan, or inside alone())."""
    import torch.distributed as dist

    if _ALONE.get() or not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Ranks(dist.get_rank(), world) if world > 1 else None


def _launched() -> bool:
    """Started by torchrun (or another launcher setting its variables) with >1 rank."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


@contextlib.contextmanager
def joined() -> Iterator[Ranks | None]:
    """The job's ranks while the scan runs: the process group the caller made, or one
    made here from torchrun's environment (gloo on the CPU, nccl when CUDA is there)
    and destroyed afterwards; None for a single process."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized() or not _launched():
        yield current()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    seconds = timeout()
    if backend == "nccl":  # one GPU per local rank, as torchrun lays them out
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"cannot join the distributed job (RANK={os.environ.get('RANK')}, "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}, MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR')}): {str(exc).splitlines()[0]}; start every "
            "rank with torchrun"
        ) from exc
    try:
        yield current()
        # every rank past its last collective before any tears the group down (a rank
        # still receiving rank 0's exit code when rank 0 left was aborted by gloo)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def failures(ranks: Ranks | None) -> Iterator[None]:
    """Errors of a distributed scan in one line that names the rank: this rank's own
    (prefixed), or a collective that failed because another rank stopped."""
    if ranks is None:
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except (NnhealthError, RuntimeError, ValueError) as exc:
        # a collective that failed inside the pass (BatchNorm's all_reduce in the
        # forward) reaches here as "the model raised": its cause says what it was
        lost = _collective_failure(exc)
        if lost is not None:
            raise DistributedError(
                f"{ranks.label}: stopped, another rank failed or stopped answering "
                f"({str(lost).strip().splitlines()[0][:200]}); its own line says why"
            ) from exc
        if isinstance(exc, NnhealthError):
            raise type(exc)(f"{ranks.label}: {exc.message}") from exc
        raise


def _collective_failure(exc: BaseException | None) -> BaseException | None:
    """The collective's error in ``exc`` or its causes, if one failed."""
    import torch.distributed as dist

    error = getattr(dist, "DistError", ())
    while exc is not None:
        text = str(exc).lower()
        if isinstance(exc, error) or (
            isinstance(exc, RuntimeError)
            and any(s in text for s in ("gloo", "nccl", "connection closed", "timed out"))
        ):
            return exc
        exc = exc.__cause__
    return None


# ---- the batch --------------------------------------------------------------------


def shard(batch: Batch, ranks: Ranks) -> Batch:
    """Rank r's part of a batch every rank loaded whole: examples [r*n/N, (r+1)*n/N)."""
    n = batch.examples
    if n < ranks.world:
        raise UsageError(
            f"the batch has {n} example(s) for {ranks.world} ranks: give each rank at "
            f"least one ({flag('data')} with more examples, or fewer processes)"
        )
    start, stop = ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world
    return batch.take(start, stop, f"{ranks.label}'s shard of {n}")


def weigh(ranks: Ranks, examples: int) -> Ranks:
    """``ranks`` with this rank's share of all ranks' examples."""
    total = int(_over(examples, ranks, "SUM"))
    return replace(ranks, share=examples / total, examples=total, local=examples)


def smallest(value: float, ranks: Ranks) -> int:
    """The least of ``value`` over the ranks (every rank gets the same)."""
    return int(_over(value, ranks, "MIN"))


def _over(value: float, ranks: Ranks, op: str) -> float:
    """A number reduced over the ranks (op: a torch.distributed.ReduceOp name)."""
    import torch.distributed as dist

    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=getattr(dist.ReduceOp, op), group=ranks.group)
    return float(box.item())


# ---- the pass ---------------------------------------------------------------------


def summed(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (a sparse one made dense first)."""
    import torch.distributed as dist

    if tensor.is_sparse:
        tensor = tensor.to_dense()
    dist.all_reduce(tensor, group=ranks.group)
    return tensor


def grads_reducer(ranks: Ranks, model: nn.Module) -> Callable[[dict], dict]:
    """run_pass's ``reduce_grads``: each parameter's gradient summed over the ranks (of
    the weighted losses: the whole batch's). A parameter without a gradient on one rank
    (a branch its examples did not take) gets zeros there, so every rank sums the same
    tensors."""
    import torch.distributed as dist

    params = dict(model.named_parameters())

    def reduce(grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
        have = torch.tensor([g is not None for g in grads.values()], dtype=torch.int32)
        dist.all_reduce(have, group=ranks.group)
        out: dict[str, torch.Tensor | None] = {}
        for (name, g), count in zip(grads.items(), have.tolist(), strict=True):
            if count and g is None:
                g = torch.zeros_like(params[name])
            out[name] = summed(g, ranks) if count else None
        return out

    return reduce


def reduce_products(op: Any, ranks: Ranks) -> Any:
    """A Hessian-vector product operator whose products and gradient are summed over
    the ranks (the whole batch's), on every rank alike."""
    op.reduce = lambda t: summed(t, ranks)
    return op


class _SyncedNorms(TorchFunctionMode):
    """BatchNorm in train mode over the whole batch: each call's per-channel sum, count
    and centred sum of squares all_reduced (differentiably, so the backward and the
    Hessian products see the normalization one process would compute)."""

    def __init__(self, ranks: Ranks) -> None:
        super().__init__()
        self.ranks = ranks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.batch_norm:
            return func(*args, **kwargs)
        call = _bn_arguments(args, kwargs)
        if not call["training"]:
            return func(*args, **kwargs)
        return self._normalize(**call)

    def _normalize(
        self, input, running_mean, running_var, weight, bias, training, momentum, eps
    ) -> torch.Tensor:
        x = input
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = _over(x.numel() // x.shape[1], self.ranks, "SUM")
        mean = self._summed(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = self._summed(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + eps).view(shape)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        if running_mean is not None and momentum is not None:
            with torch.no_grad():  # as BatchNorm would (the scan restores them anyway)
                running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                unbiased = var.detach() * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return y

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks, differentiably (the backward sums the gradients)."""
        from torch.distributed.nn.functional import all_reduce

        # deprecated in torch 2.14 (for functional collectives); it runs on 2.13 and
        # 2.14 alike and its backward is itself differentiable, as products need
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return all_reduce(t, group=self.ranks.group)


_BN_NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training")
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _bn_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = (*_BN_NAMES, "momentum", "eps")
    call = {**_BN_DEFAULTS, **dict(zip(names, args, strict=False)), **kwargs}
    return {k: call[k] for k in names}


def synced_norms(ranks: Ranks | None) -> contextlib.AbstractContextManager:
    """BatchNorm over the whole batch while the block runs (nothing for one process)."""
    if ranks is None:
        return contextlib.nullcontext()
    return _SyncedNorms(ranks)


# ---- the model --------------------------------------------------------------------


def unwrapped(model: nn.Module) -> nn.Module:
    """The module to scan: DistributedDataParallel's inner module (the scan reduces its
    own gradients; DDP's hooks fire only on .backward()). Sharded parameters are
    refused: the checks read whole tensors."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    sharded = _sharded(model)
    if sharded is not None:
        raise UsageError(
            f"the model's parameters are sharded across ranks ({sharded}): nnhealth "
            "needs whole parameters on every rank; scan a full copy (e.g. "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)) loaded into the unwrapped "
            "model), or the model before fully_shard"
        )
    return model


def _sharded(model: nn.Module) -> str | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without the distributed package
        return None
    for name, p in model.named_parameters():
        if isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor):
            return f"{name} is a DTensor, as FSDP's fully_shard makes them"
    fsdp = type(model).__name__
    if "FullyShardedDataParallel" in fsdp or "FSDP" in fsdp:
        return f"{fsdp} wraps it"
    return None


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*model.parameters(), *model.buffers()) if t.dtype.is_floating_point]


def _fingerprint(model: nn.Module) -> torch.Tensor:
    """Per floating parameter and buffer: its sum, sum of squares and an index-weighted
    sum, in float64 (equal tensors give equal bits; a difference shows in one)."""
    rows = []
    for t in _state(model):
        v = t.detach().reshape(-1).to(torch.float64)
        w = torch.arange(v.numel(), dtype=torch.float64, device=v.device) % 7 + 1
        rows.append(torch.stack([v.sum(), v.square().sum(), (v * w).sum()]).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64)


def differing(model: nn.Module, ranks: Ranks) -> list[int]:
    """The ranks whose parameters or buffers differ from rank 0's."""
    import torch.distributed as dist

    mine = _fingerprint(model)
    sizes: list[Any] = [None] * ranks.world
    dist.all_gather_object(sizes, mine.numel(), group=ranks.group)
    if len(set(sizes)) > 1:
        return [r for r, n in enumerate(sizes) if n != sizes[0]]
    gathered = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(gathered, mine, group=ranks.group)
    return [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]


def same_model(model: nn.Module, ranks: Ranks) -> None:
    """Refuse a scan whose ranks hold different weights (one model, one report)."""
    other = differing(model, ranks)
    if other:
        raise UsageError(
            f"the model's parameters or buffers on rank(s) {other} differ from rank 0's: "
            "a distributed scan is of one model; wrap it in DistributedDataParallel (which "
            "broadcasts rank 0's) or load the same weights on every rank"
        )


def broadcast_model(model: nn.Module, ranks: Ranks) -> bool:
    """Rank 0's parameters and buffers on every rank, as DistributedDataParallel does
    (a model the scan loaded itself: a factory that initializes at random gives each
    rank other weights). Whether any rank's differed."""
    import torch.distributed as dist

    if not differing(model, ranks):
        return False
    with torch.no_grad():
        for t in _state(model):
            dist.broadcast(t.data, src=0, group=ranks.group)
    return True


# ---- the statistics ---------------------------------------------------------------


def combined(capture: Capture, ranks: Ranks) -> Capture:
    """The capture of the whole batch from every rank's (the same sites in the same
    order on every rank; refused with one line when they differ)."""
    import torch.distributed as dist

    mine = (
        [_site_parts(s) for s in capture.sites],
        [_gate_parts(g) for g in capture.gates],
        capture.loss,
    )
    gathered: list[Any] = [None] * ranks.world
    dist.all_gather_object(gathered, mine, group=ranks.group)
    names = [tuple(p["name"] for p in sites) for sites, _, _ in gathered]
    if any(n != names[0] for n in names):
        raise CaptureError(
            f"the ranks ran different layers ({len(names[0])} sites on rank 0, "
            f"{[len(n) for n in names]} in all): the model must take the same path on "
            "every rank's examples"
        )
    sites = tuple(
        _site(capture.sites[i], [g[0][i] for g in gathered], ranks)
        for i in range(len(capture.sites))
    )
    gates = tuple(
        _gate(capture.gates[i], [g[1][i] for g in gathered]) for i in range(len(capture.gates))
    )
    losses = [g[2] for g in gathered]
    loss = None if any(x is None for x in losses) else float(sum(losses))
    return replace(capture, sites=sites, gates=gates, loss=loss, examples=ranks.examples)


_SUMMED_SITE = ("nonfinite", "grad_nonfinite", "examples")


def _site_parts(s: SiteStats) -> dict[str, Any]:
    parts = {f.name: getattr(s, f.name) for f in fields(s)}
    parts["count"] = s.units * s.per_unit_count
    return parts


def _pooled(counts: list[float], means: list[float], m2s: list[float]) -> tuple[float, float]:
    """Mean and sum of squared deviations of the union of groups (Chan et al.)."""
    n = float(sum(counts))
    if n == 0:
        return math.nan, 0.0
    mean = sum(c * m for c, m in zip(counts, means, strict=True)) / n
    m2 = sum(m2s) + sum(c * (m - mean) ** 2 for c, m in zip(counts, means, strict=True))
    return mean, m2


def _site(s: SiteStats, parts: list[dict[str, Any]], ranks: Ranks) -> SiteStats:
    counts = [p["count"] for p in parts]
    mean, m2 = _pooled(counts, [p["mean"] for p in parts], [p["var"] * p["count"] for p in parts])
    total = sum(counts)
    change: dict[str, Any] = {k: sum(p[k] for p in parts) for k in _SUMMED_SITE}
    change.update(mean=mean, var=m2 / total if total else math.nan)
    change["per_unit_count"] = sum(p["per_unit_count"] for p in parts)
    change["shape"] = _global_shape(s.shape, ranks)
    if s.grad_mean is not None and all(p["grad_mean"] is not None for p in parts):
        gcounts = [p["grad_count"] for p in parts]
        gmean, gm2 = _pooled(
            gcounts, [p["grad_mean"] for p in parts], [p["grad_m2"] for p in parts]
        )
        change.update(grad_count=sum(gcounts), grad_mean=gmean, grad_m2=gm2)
    change.update(_unit_arrays(parts, counts))
    return replace(s, **change)


def _unit_arrays(parts: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """Per-unit statistics over the union: ever active anywhere, saturated counts and
    interior counts summed, fingerprints' projections summed and extremes min/max."""
    out: dict[str, Any] = {}
    if parts[0]["ever_active"] is not None:
        out["ever_active"] = np.logical_or.reduce([p["ever_active"] for p in parts])
    if parts[0]["saturated_count"] is not None:
        out["saturated_count"] = np.sum([p["saturated_count"] for p in parts], axis=0)
    if parts[0]["positive_fraction"] is not None:
        weights = np.asarray(counts, dtype=np.float64)
        values = np.asarray([p["positive_fraction"] for p in parts], dtype=np.float64)
        out["positive_fraction"] = float((weights * values).sum() / weights.sum())
    if parts[0]["unit_fingerprint"] is not None:
        prints = np.stack([p["unit_fingerprint"] for p in parts])  # [ranks, units, 4]
        fp = prints.sum(axis=0)
        fp[:, -2] = prints[:, :, -2].min(axis=0)
        fp[:, -1] = prints[:, :, -1].max(axis=0)
        out["unit_fingerprint"] = fp
    if parts[0]["unit_interior"] is not None:
        interior = np.stack([p["unit_interior"] for p in parts])
        summed_interior = interior.sum(axis=0)
        summed_interior[(interior < 0).any(axis=0)] = -1  # not counted on some rank
        out["unit_interior"] = summed_interior
    return out


def _global_shape(shape: tuple[int, ...], ranks: Ranks) -> tuple[int, ...]:
    """The site's shape over the whole batch: a first axis of this rank's example
    count becomes the whole batch's (one rank's shape otherwise: a sequence-first
    site keeps it)."""
    dims = list(shape)
    if dims and dims[0] == ranks.local:
        dims[0] = ranks.examples
    return tuple(dims)


def _gate_parts(g: GateStats) -> dict[str, Any]:
    return {f.name: getattr(g, f.name) for f in fields(g)}


_SUMMED_GATE = ("values", "below", "above", "total", "pre_total", "pre_squares")


def _gate(g: GateStats, parts: list[dict[str, Any]]) -> GateStats:
    return replace(g, **{k: sum(p[k] for p in parts) for k in _SUMMED_GATE})


def note(ranks: Ranks) -> str:
    """The report's note on how the ranks were combined."""
    return (
        f"distributed: {ranks.world} ranks, {ranks.examples} examples in all; the loss is "
        "their mean, statistics and gradients combined over all of them, BatchNorm "
        "normalized over the whole batch, Hessian products summed over the ranks"
    )


def broadcast_code(code: int, ranks: Ranks | None) -> int:
    """Rank 0's exit code, on every rank."""
    if ranks is None:
        return code
    import torch.distributed as dist

    box = torch.tensor([code], dtype=torch.int64)
    dist.broadcast(box, src=0, group=ranks.group)
    return int(box.item())
