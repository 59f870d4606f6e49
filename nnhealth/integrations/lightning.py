"""nnhealth.Monitor as a Lightning callback.

    from nnhealth.integrations.lightning import NnhealthCallback

    trainer = lightning.Trainer(callbacks=[NnhealthCallback(every=100, log="nnhealth.jsonl")])
    trainer.fit(module, loader)

The monitor watches the LightningModule with the trainer's first optimizer. A training
step is one optimizer step (``trainer.global_step``): with gradient accumulation only
the micro-batch that ends in the optimizer step is observed (its forward; the gradients
read are the accumulated ones). The step begins in ``on_train_batch_start`` (with the
batch Lightning passes, or the module's own call when nnhealth cannot read that batch),
the loss is read in ``on_before_backward`` and the step ends in
``on_before_optimizer_step``: after the backward, before gradient clipping and the
update, so ``.grad`` is the backward's own. ``on_finding="stop"`` sets
``trainer.should_stop`` (across processes: any rank's stop, reduced on every step);
a step that raises is abandoned (its hooks removed). Under several processes each rank
watches its own batch and only rank 0 writes ``log``.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package, when the unified one is not installed
    try:
        from pytorch_lightning import Callback
    except ImportError:
        raise ImportError(
            "nnhealth.integrations.lightning needs Lightning: pip install 'nnhealth[lightning]'"
        ) from None

from nnhealth.errors import NnhealthError
from nnhealth.monitor import Monitor


class NnhealthCallback(Callback):
    """Run ``nnhealth.Monitor`` in ``Trainer.fit``. Keywords as Monitor's (``every``,
    ``hessian_every``, ``log``, ``on_finding``, ``checks``, ``ignore``, ``fail_on``,
    ``loss_fn``, ``options``, ``seed``). ``monitor``: the Monitor of the current fit
    (its ``lines``, ``findings`` and ``reports``), None before the fit starts."""

    def __init__(
        self,
        every: int = 100,
        hessian_every: int | None = None,
        log: Any = None,
        on_finding: str = "warn",
        **keywords: Any,
    ) -> None:
        super().__init__()
        self._keywords = dict(
            every=every, hessian_every=hessian_every, log=log, on_finding=on_finding, **keywords
        )
        self.monitor: Monitor | None = None
        self._open = False

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # the optimizers exist from here on (the strategy's setup made them)
        if self.monitor is None or self.monitor.model is not pl_module:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            keywords = dict(self._keywords)
            if trainer.global_rank != 0:
                keywords["log"] = None  # one history file, written by rank 0
            self.monitor = Monitor(pl_module, optimizer, **keywords)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None or not _ends_step(trainer, batch_idx):
            return
        self._close()
        step, epoch = trainer.global_step, trainer.current_epoch
        try:
            self.monitor.begin(batch, step=step, epoch=epoch)
        except NnhealthError:  # a batch nnhealth cannot read: the module's call is the batch
            self.monitor.begin(None, step=step, epoch=epoch)
        self._open = True

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._open:
            # Lightning divides the loss by accumulate_grad_batches before the backward
            self.monitor.observe(loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._open:
            return
        self._open = False
        self.monitor.end()
        # on every optimizer step, every rank alike (a non-finite loss can stop any step):
        # any rank's stop stops them all
        stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
        if stop:
            trainer.should_stop = True

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()  # still open: the step skipped its optimizer step

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def _close(self) -> None:
        if self._open:
            self._open = False
            self.monitor.abandon()


def _ends_step(trainer: Any, batch_idx: int) -> bool:
    """Whether this micro-batch ends in an optimizer step (Lightning's own rule: every
    ``accumulate_grad_batches`` batches, and the epoch's last batch)."""
    every = trainer.accumulate_grad_batches
    if every <= 1:
        return True
    last = trainer.num_training_batches
    return (batch_idx + 1) % every == 0 or (isinstance(last, int) and batch_idx + 1 == last)
