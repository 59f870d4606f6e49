"""Choose the loss: cross-entropy for class targets (or logits without targets), MSE for
float targets, BCE on request; random seeded targets when the batch has none."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nnhealth._util import escaped
from nnhealth.errors import DataError, flag

NAMES = {"ce": "cross-entropy", "mse": "mse", "bce": "bce-with-logits"}


def primary_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise DataError(
        f"the model returned a {type(output).__name__} with no tensor to take a loss of"
    )


class LossResolver:
    """Callable turning the model's output into a scalar loss; records what it chose."""

    def __init__(
        self,
        choice: str,
        targets: torch.Tensor | None,
        seed: int,
        custom: Callable | None = None,
    ) -> None:
        self.choice = choice
        self.targets = targets
        self.seed = seed
        self.custom = custom
        self.description = ""
        self.notes: list[str] = []
        self.output_shape: list[int] | None = None

    def _gen(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + 1)

    def __call__(self, output: Any) -> torch.Tensor:
        if self.custom is not None:
            out = primary_output(output) if not isinstance(output, torch.Tensor) else output
            self.output_shape = list(out.shape)
            self.description = (
                f"custom ({getattr(self.custom, '__name__', type(self.custom).__name__)})"
            )
            try:
                loss = (
                    self.custom(output, self.targets)
                    if self.targets is not None
                    else self.custom(output)
                )
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # the user's loss: sys.exit and BaseException too
                raise DataError(
                    f"the loss function {self.description[8:-1]} {escaped(exc)}; check it "
                    f"against the model's output {self.output_shape} and the targets"
                ) from exc
            return self._scalar(loss)
        out = primary_output(output)
        self.output_shape = list(out.shape)
        if not out.is_floating_point():
            raise DataError(f"the model's output is {out.dtype}; nnhealth needs a float output")
        kind = self.choice if self.choice != "auto" else self._auto(out)
        try:
            loss = getattr(self, f"_{kind}")(out)
        except DataError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DataError(
                f"the {NAMES[kind]} loss failed on outputs {list(out.shape)} and targets "
                f"{None if self.targets is None else list(self.targets.shape)}: "
                f"{str(exc).splitlines()[0]}; choose another {flag('loss')} or fix the targets"
            ) from exc
        return self._scalar(loss)

    def _scalar(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise DataError("the loss function must return a scalar tensor")
        return loss.reshape(())

    def _auto(self, out: torch.Tensor) -> str:
        y = self.targets
        if y is None:
            return "ce" if out.ndim == 2 and out.shape[1] >= 2 else "mse"
        if not (y.is_floating_point() or y.is_complex()):
            return "ce"
        return "mse"

    def _ce(self, out: torch.Tensor) -> torch.Tensor:
        y = self.targets
        if out.ndim < 2:
            raise DataError(
                f"cross-entropy needs outputs with a class dimension, got {list(out.shape)}"
            )
        if y is None:
            classes = out.shape[1]
            shape = (out.shape[0], *out.shape[2:])
            y = torch.randint(0, classes, shape, generator=self._gen(out.device), device=out.device)
            self.description = "cross-entropy"
            self.notes.append(f"no targets: random class labels over {classes} classes (seeded)")
            return F.cross_entropy(out, y)
        if y.is_floating_point():
            self.description = "cross-entropy (soft targets)"
            return F.cross_entropy(out, y.to(out.dtype))
        expected = [out.shape[0], *out.shape[2:]]
        if list(y.shape) != expected:
            raise DataError(
                f"class targets of shape {list(y.shape)} do not fit outputs of shape "
                f"{list(out.shape)} (cross-entropy expects targets of shape {expected})"
            )
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= out.shape[1]:
            raise DataError(
                f"class targets range over [{lo}, {hi}] but the model outputs {out.shape[1]} "
                "classes; check the labels or the output layer"
            )
        self.description = "cross-entropy"
        return F.cross_entropy(out, y.long())

    def _float_targets(
        self, out: torch.Tensor, sampler: Callable[[], torch.Tensor], what: str
    ) -> torch.Tensor:
        y = self.targets
        if y is None:
            self.notes.append(f"no targets: {what} (seeded)")
            return sampler()
        y = y.to(out.dtype)
        if y.numel() != out.numel():
            raise DataError(
                f"targets of shape {list(y.shape)} do not fit outputs of shape {list(out.shape)}"
            )
        return y.reshape(out.shape)

    def _mse(self, out: torch.Tensor) -> torch.Tensor:
        gen = self._gen(out.device)
        y = self._float_targets(
            out,
            lambda: torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype),
            "regression to random unit-Gaussian targets",
        )
        self.description = "mse"
        return F.mse_loss(out, y)

    def _bce(self, out: torch.Tensor) -> torch.Tensor:
        gen = self._gen(out.device)
        y = self._float_targets(
            out,
            lambda: torch.randint(0, 2, out.shape, generator=gen, device=out.device).to(out.dtype),
            "random 0/1 targets",
        )
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise DataError("bce targets must lie in [0, 1]")
        self.description = "bce-with-logits"
        return F.binary_cross_entropy_with_logits(out, y)
