"""nnhealth.Monitor: the scan's checks inside a training loop.

    monitor = nnhealth.Monitor(model, optimizer, every=100, hessian_every=1000,
                               log="nnhealth.jsonl")
    for x, y in loader:
        with monitor.step((x, y)):
            loss = F.cross_entropy(model(x), y)
            monitor.observe(loss)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        if monitor.should_stop:
            break

The user's forward, backward and optimizer step run as they would without it. On a
capture step (every ``every`` steps, from step 0) the scan's own recorder is attached
for that step alone (capture.Observation: module hooks, the activation mode, tensor
hooks that read the gradient at each output), the parameters' ``.grad`` is read after
the user's backward, and the scan's checks run on what was seen (runner.run with the
observed pass: the same statistics and findings as a scan of that batch). Between
capture steps nothing is attached; ``observe(loss)`` only reads the loss's value, to
catch the first non-finite one. Every ``hessian_every`` steps lambda_max is measured on
the step's batch (extra products, after the user's backward; ``.grad`` is not touched),
judged against the optimizer's limit at its current lr.

Each capture step appends one line to ``log`` (history.py, schema nnhealth-history/1)
and the checks over time run on the history (dead units rising, lambda_max reaching the
stability limit, relative updates drifting, the first non-finite value). A finding at or
above ``fail_on`` (new by its check, layer and kind) is handled by ``on_finding``:
"warn" (a NnhealthWarning with the layer and the fix), "raise" (TrainingHealthError,
carrying the finding) or "stop" (``should_stop`` becomes True: the loop, or the
Lightning / Hugging Face callback, stops training).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nnhealth import history
from nnhealth.errors import NnhealthError, UsageError
from nnhealth.findings import Finding, Report, Severity

ACTIONS = ("warn", "raise", "stop")


class NnhealthWarning(UserWarning):
    """A finding of nnhealth.Monitor (on_finding="warn")."""


class TrainingHealthError(Exception):
    """A finding of nnhealth.Monitor at or above its ``fail_on`` (on_finding="raise")."""

    def __init__(self, finding: Finding, step: int) -> None:
        super().__init__(describe(finding, step))
        self.finding = finding
        self.step = step


def describe(finding: Finding, step: int) -> str:
    where = f" {finding.layer}" if finding.layer else ""
    return (
        f"nnhealth: step {step}: {finding.code} {finding.severity.label}{where}: "
        f"{finding.message}. Fix: {finding.fix}"
    )


class Monitor:
    """Watch a training loop (see the module docstring). Keywords as ``nnhealth.scan``'s
    where they mean the same: ``checks`` (codes or names to run, default all but those
    that are opt-in), ``ignore``, ``loss_fn`` (for the Hessian steps, when the batch's
    targets and the automatic loss do not give the training loss), ``options`` (check
    thresholds), ``seed``."""

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        *,
        every: int = 100,
        checks: list[str] | None = None,
        ignore: list[str] | None = None,
        hessian_every: int | None = None,
        log: str | Path | None = None,
        on_finding: str = "warn",
        fail_on: str = "error",
        loss_fn: Callable | None = None,
        options: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        from torch import nn

        if not isinstance(model, nn.Module):
            raise UsageError(f"Monitor watches a torch.nn.Module, not {type(model).__name__}")
        self.every = _positive("every", every)
        self.hessian_every = (
            None if hessian_every is None else _positive("hessian_every", hessian_every)
        )
        if on_finding not in ACTIONS:
            raise UsageError(f"on_finding={on_finding!r}: expected one of {', '.join(ACTIONS)}")
        try:
            self.fail_on = Severity.parse(fail_on)
        except ValueError as exc:
            raise UsageError(f"fail_on: {exc}") from None
        from nnhealth import distributed

        # DistributedDataParallel's module (its forward runs inside DDP's); sharded
        # parameters are refused with one line, as by scan()
        self.model = distributed.unwrapped(model)
        self.optimizer = optimizer
        self.on_finding = on_finding
        self.log = None if log is None else _history_file(Path(log))
        self._keywords = {
            "select": checks,
            "ignore": ignore,
            "loss_fn": loss_fn,
            "options": options,
            "seed": seed,
        }
        self.lines: list[dict[str, Any]] = []  # the history, as written to ``log``
        self.findings: list[tuple[int, Finding]] = []  # (step, finding) handled so far
        self.reports: dict[int, Report] = {}  # the latest capture step's report, by step
        self.should_stop = False
        self.steps = 0  # the next step's index
        self._seen: set[str] = set()
        self._started = time.perf_counter()
        self._open: _Open | None = None
        self._nonfinite_seen = False
        self._warned: set[str] = set()
        self._plan(hessian=False)  # checks, options and the optimizer refused here, not mid-run

    # ---- the loop's side -------------------------------------------------------------

    @contextlib.contextmanager
    def step(
        self, batch: Any = None, *, step: int | None = None, epoch: int | None = None
    ) -> Iterator[Monitor]:
        """Around one training step's forward and backward (``batch``: what the model is
        called on, as nnhealth.scan takes it; None: taken from the model's call)."""
        self.begin(batch, step=step, epoch=epoch)
        try:
            yield self
        except BaseException:
            self.abandon()
            raise
        self.end()

    def begin(
        self, batch: Any = None, *, step: int | None = None, epoch: int | None = None
    ) -> None:
        """The start of a step (step() calls it; callbacks call begin and end)."""
        if self._open is not None:
            self.abandon()
        index = self.steps if step is None else int(step)
        hessian = self.hessian_every is not None and index % self.hessian_every == 0
        capture = index % self.every == 0 or hessian
        if hessian and _synced_norms(self.model):
            hessian = False
            self._warn_once(
                "synced",
                "nnhealth: Hessian steps skipped: SyncBatchNorm all-reduces in every forward, "
                "and the ranks' products would stop matching (each rank measures alone)",
            )
        opened = _Open(index, epoch, batch, hessian)
        if capture:
            try:
                opened.batch = _interpreted(batch)  # once: the analysis takes it as it is
            except NnhealthError as exc:  # a batch nnhealth cannot read: the model's call
                self._warn_once(
                    "batch", f"nnhealth: {exc.message}; the batch is taken from the model's call"
                )
                opened.batch = None
            examples = None if opened.batch is None else opened.batch.examples
            opened.observation = self._observe(examples)
        self._open = opened

    def observe(self, loss: Any) -> None:
        """The step's loss (its value is read; a non-finite one is recorded with the step
        and the layers where weights or gradients went non-finite)."""
        if self._open is None:
            raise UsageError("Monitor.observe(loss) belongs inside `with monitor.step(batch):`")
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        self._open.loss = value
        if self._open.observation is not None:
            self._open.observation.loss = value

    def end(self) -> None:
        """The end of a step, after its backward: analyse a capture step."""
        opened, self._open = self._open, None
        if opened is None:
            return
        self.steps = opened.index + 1
        if opened.observation is not None:
            opened.observation.__exit__(None, None, None)
            self._captured(opened)
        elif opened.loss is not None and not math.isfinite(opened.loss):
            self._nonfinite(opened)

    def abandon(self) -> None:
        """The step raised: its hooks are removed, nothing is analysed."""
        opened, self._open = self._open, None
        if opened is not None and opened.observation is not None:
            opened.observation.__exit__(None, None, None)

    # ---- capture steps -------------------------------------------------------------

    def _observe(self, examples: int | None) -> Any:
        from nnhealth.capture.instrument import Observation

        plan = self._plan(hessian=False)
        observation = Observation(self.model, plan, examples, batch_from_call=examples is None)
        return observation.__enter__()

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, NnhealthWarning, stacklevel=_caller_level())

    def _scan_arguments(self, hessian: bool) -> tuple[Any, Any]:
        import nnhealth

        given = {
            name: p.default
            for name, p in inspect.signature(nnhealth.scan).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        given.update(self._keywords)
        given.update(
            model=self.model,
            optimizer=self.optimizer,
            hessian=hessian,
            mode="train" if self.model.training else "eval",
        )
        return nnhealth._arguments(given)

    def _plan(self, hessian: bool) -> Any:
        from nnhealth import runner

        loaded, opts = self._scan_arguments(hessian)
        optimizer, _ = runner.scan_optimizer(loaded, opts)
        checks = runner._resolve_checks(opts, optimizer.lr)
        return runner._plan(checks, opts, optimizer)

    def _captured(self, opened: _Open) -> None:
        from nnhealth import distributed, runner

        observation = opened.observation
        try:
            batch = opened.batch if opened.batch is not None else observation.called()
            loaded, opts = self._scan_arguments(opened.hessian)
            with distributed.alone():
                report = runner.run(
                    loaded,
                    batch,
                    opts,
                    optimizer=runner.scan_optimizer(loaded, opts),
                    observed=observation,
                )
        except Exception as exc:  # noqa: BLE001 (the analysis must never end the training)
            why = exc.message if isinstance(exc, NnhealthError) else f"internal error: {exc!r}"
            warnings.warn(
                f"nnhealth: step {opened.index} not analysed: {why}",
                NnhealthWarning,
                stacklevel=_caller_level(),
            )
            return
        self.reports = {opened.index: report}
        lr = report.run.get("lr")
        line = history.record(
            report,
            opened.index,
            elapsed=time.perf_counter() - self._started,
            lr=lr,
            epoch=opened.epoch,
        )
        if opened.loss is not None and not math.isfinite(opened.loss):
            line["nonfinite"] = {"loss": str(opened.loss), "layer": self._first_nonfinite()}
        self._append(line)
        own = [f for f in report.findings if f.severity >= self.fail_on]
        self._handle(opened.index, own)

    def _nonfinite(self, opened: _Open) -> None:
        """A non-finite loss between capture steps: one line, the first time."""
        if self._nonfinite_seen:
            return
        self._nonfinite_seen = True
        line = history.nonfinite_record(
            opened.index,
            elapsed=time.perf_counter() - self._started,
            loss=opened.loss,
            layer=self._first_nonfinite(),
            epoch=opened.epoch,
        )
        self._append(line)
        self._handle(opened.index, [])

    def _first_nonfinite(self) -> str | None:
        """The module of the first parameter (in the model's order) whose weight is not
        finite (where it went wrong: a NaN weight makes every gradient below it NaN);
        else of the first whose gradient is not."""
        import torch

        named = list(self.model.named_parameters())
        for tensors in ([p.detach() for _, p in named], [p.grad for _, p in named]):
            for (name, _), t in zip(named, tensors, strict=True):
                if t is not None and not bool(torch.isfinite(t).all()):
                    return name.rsplit(".", 1)[0] if "." in name else name
        return None

    def _append(self, line: dict[str, Any]) -> None:
        self.lines.append(line)
        if self.log is not None:
            try:
                history.write_line(self.log, line)
            except OSError as exc:  # a full disk must not end the training
                self._warn_once(
                    "log",
                    f"nnhealth: cannot write {self.log} ({exc}); the history is kept in monitor.lines only",
                )
                self.log = None

    def _handle(self, step: int, own: list[Finding]) -> None:
        """The step's findings and the history's verdicts, each handled once."""
        over_time = [
            f
            for f in history.verdicts(self.lines, self._keywords["options"])
            if f.severity >= self.fail_on
        ]
        # a step's own finding that a verdict over time already tells (the same check at
        # the same layer: NH401's limit at the crossing step) is not told twice
        told = {(f.code, f.layer) for f in over_time}
        own = [f for f in own if (f.code, f.layer) not in told]
        for finding in [*over_time, *own]:
            told_as = f"{finding.key}:{finding.severity.label}"  # a warning, then an error
            if told_as in self._seen:
                continue
            self._seen.add(told_as)
            self.findings.append((step, finding))
            self._act(finding, step)

    def _act(self, finding: Finding, step: int) -> None:
        if self.on_finding == "raise":
            raise TrainingHealthError(finding, step)
        if self.on_finding == "stop":
            self.should_stop = True
        warnings.warn(describe(finding, step), NnhealthWarning, stacklevel=_caller_level())

    def verdicts(self) -> list[Finding]:
        """The checks over time on the history so far (every severity)."""
        return history.verdicts(self.lines, self._keywords["options"])


class _Open:
    """The step in progress (a capture step holds its entered ``observation``)."""

    def __init__(self, index: int, epoch: int | None, batch: Any, hessian: bool) -> None:
        self.index = index
        self.epoch = epoch
        self.batch = batch
        self.hessian = hessian
        self.loss: float | None = None
        self.observation: Any = None


def _caller_level() -> int:
    """The stacklevel of the first frame outside nnhealth and contextlib (the user's
    training loop, or the callback's trainer), for warnings."""
    import sys

    ours = (str(Path(__file__).parent), contextlib.__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name}={value!r}: expected a whole number of steps, at least 1")
    return value


def _history_file(path: Path) -> Path:
    """``path`` for appending history lines: refused when it exists and is not an
    nnhealth history (the monitor never writes into another file)."""
    if path.is_dir():
        raise UsageError(f"log={str(path)!r} is a directory; give a file such as nnhealth.jsonl")
    if not path.parent.is_dir():
        raise UsageError(f"log={str(path)!r}: the directory {str(path.parent)!r} does not exist")
    if path.exists() and path.stat().st_size:
        with path.open("rb") as f:
            first = f.readline(4096)
        if history.SCHEMA.encode() not in first:
            raise UsageError(
                f"log={str(path)!r} exists and is not an nnhealth history; give a new file "
                "(the monitor appends to its own histories only)"
            )
    return path


def _synced_norms(model: Any) -> bool:
    """SyncBatchNorm in train mode inside a job of several ranks (its collectives would
    run in a Hessian step that each rank takes alone)."""
    import torch.distributed as dist
    from torch import nn

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    return any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules())


def _interpreted(batch: Any) -> Any:
    """The step's batch as a scan takes it (a loading.batch.Batch; None: it comes from
    the model's call)."""
    if batch is None:
        return None
    from nnhealth.loading.batch import interpret

    return interpret(batch, "the step's batch")
