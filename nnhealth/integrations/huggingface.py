"""nnhealth.Monitor as a Hugging Face ``TrainerCallback``.

    from nnhealth.integrations.huggingface import NnhealthTrainerCallback

    trainer = transformers.Trainer(model, args, train_dataset=data,
                                   callbacks=[NnhealthTrainerCallback(every=100)])
    trainer.train()

The monitor watches the Trainer's model with its optimizer. A step is one optimizer step
(``state.global_step``); the batch is the model's own call (the keyword arguments the
Trainer passes, labels included). With gradient accumulation the last micro-batch before
the optimizer step is observed (its forward; the gradients read are the accumulated
ones). The step ends in ``on_pre_optimizer_step``: after the backward and the Trainer's
gradient clipping (``max_grad_norm``), before the update. The loss is read from the
model's output (its ``loss``, when the model computes one). ``on_finding="stop"`` sets
``control.should_training_stop`` (across processes: on every rank when any rank's monitor
stops; only the main process writes ``log``). The Trainer has no event for a step that raises: after
a failed ``train()``, call ``close()`` to remove the hooks of an unfinished capture step
(the next ``train()`` removes them too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError(
        "nnhealth.integrations.huggingface needs transformers and accelerate: "
        "pip install 'nnhealth[hf]'"
    ) from None

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # the event a step ends in
    raise ImportError(
        "nnhealth.integrations.huggingface needs a transformers whose Trainer calls "
        "on_pre_optimizer_step (after the backward, before the update): "
        "pip install -U 'nnhealth[hf]'"
    )

from nnhealth.monitor import Monitor


class NnhealthTrainerCallback(TrainerCallback):
    """Run ``nnhealth.Monitor`` in ``Trainer.train``. Keywords as Monitor's (``every``,
    ``hessian_every``, ``log``, ``on_finding``, ``checks``, ``ignore``, ``fail_on``,
    ``loss_fn``, ``options``, ``seed``). ``monitor``: the Monitor of the current
    training (its ``lines``, ``findings`` and ``reports``), None before it starts."""

    def __init__(
        self,
        every: int = 100,
        hessian_every: int | None = None,
        log: Any = None,
        on_finding: str = "warn",
        **keywords: Any,
    ) -> None:
        self._keywords = dict(
            every=every, hessian_every=hessian_every, log=log, on_finding=on_finding, **keywords
        )
        self.monitor: Monitor | None = None
        self._step: tuple[int, int] | None = None  # (step, epoch) in progress
        self._handle: Any = None  # the forward hook that reads the loss
        self._losses: list[tuple[Any, bool]] = []  # each micro-batch's (loss, scaled)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()
        model = kwargs.get("model")
        if self.monitor is None or self.monitor.model is not model:
            optimizer = _unwrapped(kwargs.get("optimizer"))
            keywords = dict(self._keywords)
            if not state.is_world_process_zero:
                keywords["log"] = None  # one history per job, written by the main process
            self.monitor = Monitor(model, optimizer, **keywords)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        epoch = math.floor(state.epoch) if state.epoch is not None else None
        self._losses = []
        self._begin((state.global_step, epoch))

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a micro-batch that ends in no optimizer step: the next one may be the step's last
        if self._step is not None:
            self._begin(self._step)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step is None:
            return
        self._unhook()
        self._step = None
        loss = _step_loss(self._losses)
        if loss is not None:
            self.monitor.observe(loss)
        self.monitor.end()
        if _any_rank(self.monitor.should_stop):
            control.should_training_stop = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()  # still open: no optimizer step came

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Abandon a step in progress (its hooks are removed, nothing is analysed)."""
        self._unhook()
        if self._step is not None:
            self._step = None
            self.monitor.abandon()

    def _begin(self, at: tuple[int, int | None]) -> None:
        self._unhook()
        self._step = at
        self.monitor.begin(None, step=at[0], epoch=at[1])
        model = self.monitor.model
        self._handle = model.register_forward_hook(self._returned, with_kwargs=True)

    def _returned(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        """The micro-batch's first call of the model: its loss, when its output has one."""
        self._unhook()
        loss = output.get("loss") if isinstance(output, Mapping) else None
        if loss is not None and getattr(loss, "ndim", None) == 0:
            self._losses.append((loss.detach(), "num_items_in_batch" in kwargs))

    def _unhook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _any_rank(stop: bool) -> bool:
    """``stop`` on any rank of the job (every rank calls this on every optimizer step):
    one rank leaving the loop alone would leave the others waiting in DDP's all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return stop
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _step_loss(losses: list[tuple[Any, bool]]) -> float | None:
    """The step's loss from its micro-batches' as the Trainer combines them: a loss the
    model divided by the step's token count (``num_items_in_batch``) is a share of the
    step's, summed; a per-micro-batch mean is averaged."""
    if not losses:
        return None
    values = [float(loss) for loss, _ in losses]
    if any(scaled for _, scaled in losses):
        return math.fsum(values)
    return math.fsum(values) / len(values)


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's AcceleratedOptimizer (itself an
    Optimizer subclass that delegates to the one it wraps)."""
    import torch

    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer
