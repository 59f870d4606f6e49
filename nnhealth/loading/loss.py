"""Choose the loss: the model's own when its output carries one (labels passed through to
a forward that takes them), cross-entropy for class or token targets (the next-token
objective when the targets are the input ids, or when there are no targets and the model
maps token ids to [N, T, V] logits), MSE for float targets, BCE on request; seeded random
targets when the batch has none, and the run's ``loss`` says so."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nnhealth._util import escaped, tensors_in
from nnhealth.errors import DataError, flag

NAMES = {
    "ce": "cross-entropy",
    "mse": "mse",
    "bce": "bce-with-logits",
    "nll": "cross-entropy on the softmax's probabilities",
    "bce_prob": "binary cross-entropy on the sigmoid's probabilities",
}
IGNORE_INDEX = -100  # F.cross_entropy's default, and Hugging Face's padding label
# forward() keywords a keyword batch's targets are passed under, first match wins
LABEL_KEYWORDS = ("labels", "targets")
NO_TARGETS = "(no targets given)"


def _named(output: Any, key: str) -> Any:
    """``output[key]`` of a dict, else ``output.key`` (a dataclass-like output)."""
    if isinstance(output, dict):
        return output.get(key)
    if isinstance(output, torch.Tensor):
        return None
    return getattr(output, key, None)


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a loss is taken of: ``logits`` by key or attribute, else the first
    tensor with a batch dimension (a leading scalar is a loss, as in Hugging Face's
    ``(loss, logits, ...)`` tuples), else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = _named(output, "logits")
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        tensors = [t for t in output if isinstance(t, torch.Tensor)]
        if tensors:
            return next((t for t in tensors if t.ndim), tensors[0])
    raise DataError(
        f"the model returned a {type(output).__name__} with no tensor to take a loss of"
    )


def own_loss(output: Any, labelled: bool) -> tuple[torch.Tensor, str] | None:
    """The loss the model computed itself and where it was found: ``loss`` by key or
    attribute; in a tuple, its one scalar tensor when labels were passed to the model."""
    loss = _named(output, "loss")
    if isinstance(loss, torch.Tensor):
        where = "output['loss']" if type(output) is dict else "output.loss"
        return loss, where
    if labelled and isinstance(output, (tuple, list)):
        scalars = [
            i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.numel() == 1
        ]
        if len(scalars) == 1:
            return output[scalars[0]], f"output[{scalars[0]}]"
    return None


def accepts(model: Any, keyword: str) -> bool:
    """Whether ``model.forward`` names ``keyword`` as a parameter (not only **kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    p = params.get(keyword)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def token_ids(inputs: Any) -> torch.Tensor | None:
    """The [N, T] integer token ids among the inputs: ``input_ids`` of a keyword batch,
    else the first integer tensor."""
    if isinstance(inputs, dict) and isinstance(inputs.get("input_ids"), torch.Tensor):
        candidates = [inputs["input_ids"]]
    else:
        candidates = tensors_in(inputs)
    for t in candidates:
        if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            return t if t.ndim == 2 else None
    return None


def objective(
    model: Any,
    inputs: Any,
    targets: torch.Tensor | None,
    choice: str,
    seed: int,
    custom: Callable | None = None,
    part: tuple[int, int, int] | None = None,
) -> tuple[Any, LossResolver]:
    """The inputs to call the model with and the loss of its output. With the automatic
    loss, a keyword batch's targets go to the model as ``labels`` (or ``targets``) when
    its forward takes them, so a model that computes its own loss (Hugging Face) does.
    ``part``: the batch is examples start:stop of a larger one (Batch.part)."""
    key = None
    if choice == "auto" and custom is None and targets is not None and isinstance(inputs, dict):
        key = next((k for k in LABEL_KEYWORDS if k not in inputs and accepts(model, k)), None)
    resolver = LossResolver(choice, targets, seed, custom, inputs=inputs, labels_key=key)
    resolver.masked = masked_lm(model)
    resolver.part = part
    return resolver.with_labels(inputs), resolver


def masked_lm(model: Any) -> bool:
    """A masked (bidirectional) language model: token t is predicted from the whole
    sequence, so its target is token t itself, not t + 1 (BertForMaskedLM, ...)."""
    return "MaskedLM" in type(model).__name__


class LossResolver:
    """Callable turning the model's output into a scalar loss; records what it chose
    (``description``: the objective and why) and notes on how."""

    def __init__(
        self,
        choice: str,
        targets: torch.Tensor | None,
        seed: int,
        custom: Callable | None = None,
        *,
        inputs: Any = None,
        labels_key: str | None = None,
    ) -> None:
        self.choice = choice
        self.targets = targets
        self.seed = seed
        self.custom = custom
        self.ids = token_ids(inputs)
        self.masked = False  # a masked LM: targets equal to the inputs are not shifted
        self.labels_key = labels_key
        self.description = ""
        self.notes: list[str] = []
        self.output_shape: list[int] | None = None
        self.part: tuple[int, int, int] | None = None  # see _draw
        # a distributed scan's rank: its share of the examples (the ranks' weighted
        # losses sum to the whole batch's mean loss)
        self.weight = 1.0

    def with_labels(self, inputs: Any) -> Any:
        """``inputs`` with the targets added under the forward's label keyword, when the
        targets go to the model."""
        if self.labels_key is None or not isinstance(inputs, dict):
            return inputs
        return {**inputs, self.labels_key: self.targets}

    def _gen(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed + 1)

    def _draw(self, shape: tuple[int, ...], draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``draw(shape)`` (seeded); for a part of a larger batch (``part``: examples
        start:stop of n) the whole batch's draw, sliced: a rank's shard or a sub-batch
        then gets the random targets one process would give those examples."""
        part = self.part
        if part is None or not shape or shape[0] != part[1] - part[0]:
            return draw(shape)
        return draw((part[2], *shape[1:]))[part[0] : part[1]]

    def __call__(self, output: Any) -> torch.Tensor:
        loss = self._loss(output)
        return loss if self.weight == 1.0 else loss * self.weight

    def _loss(self, output: Any) -> torch.Tensor:
        if self.custom is not None:
            return self._custom(output)
        if self.choice == "auto":
            own = self._own(output)
            if own is not None:
                return own
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

    def _custom(self, output: Any) -> torch.Tensor:
        out = primary_output(output)
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

    def _own(self, output: Any) -> torch.Tensor | None:
        """The model's own loss when its output carries a differentiable scalar one."""
        found = own_loss(output, self.labels_key is not None)
        if found is None:
            if self.labels_key is not None:
                self.notes.append(
                    f"the targets were passed to the model as {self.labels_key}=, but its "
                    "output carries no loss: the loss is computed from its output"
                )
            return None
        loss, where = found
        if not (loss.is_floating_point() and loss.numel() == 1 and loss.requires_grad):
            self.notes.append(
                f"the model's own loss ({where}) is not a differentiable scalar "
                f"({list(loss.shape)}, requires_grad={loss.requires_grad}): not used"
            )
            return None
        try:
            self.output_shape = list(primary_output(output).shape)
        except DataError:
            self.output_shape = None
        via = f", from {self.labels_key}= passed to forward" if self.labels_key else ""
        self.description = f"the model's own loss ({where}{via})"
        return loss.reshape(())

    def _scalar(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise DataError("the loss function must return a scalar tensor")
        return loss.reshape(())

    def _auto(self, out: torch.Tensor) -> str:
        y = self.targets
        probabilities = self._probabilities(out)
        if probabilities is not None:
            return probabilities
        if y is None:
            logits = (out.ndim == 2 and out.shape[1] >= 2) or self._causal(out)
            return "ce" if logits else "mse"
        if not (y.is_floating_point() or y.is_complex()):
            return "ce"
        return "mse"

    def _probabilities(self, out: torch.Tensor) -> str | None:
        """A model that ends in a sigmoid or softmax outputs probabilities: the loss that
        goes with them is cross-entropy on those probabilities (what nn.BCELoss or
        NLLLoss of their log compute), not a loss that would read them as logits."""
        fn = type(out.grad_fn).__name__ if out.grad_fn is not None else ""
        y = self.targets
        probabilities = y is None or (
            y.is_floating_point() and float(y.min()) >= 0 and float(y.max()) <= 1
        )
        if fn.startswith("SigmoidBackward") and probabilities:
            return "bce_prob"
        softmax = fn.startswith("SoftmaxBackward") and out.ndim == 2 and out.shape[1] >= 2
        if softmax and (y is None or not y.is_floating_point()):
            return "nll"
        return None

    def _nll(self, out: torch.Tensor) -> torch.Tensor:
        # log p floored where p underflowed to 0, as nn.BCELoss floors its logs
        loss = self._ce(out.clamp_min(torch.finfo(out.dtype).tiny).log())
        self.description = self.description.replace("cross-entropy", NAMES["nll"], 1)
        return loss

    def _bce_prob(self, out: torch.Tensor) -> torch.Tensor:
        loss = self._bce(out, F.binary_cross_entropy)
        self.description = self.description.replace("bce-with-logits", NAMES["bce_prob"], 1)
        return loss

    def _causal(self, out: torch.Tensor) -> bool:
        """Whether ``out`` is [N, T, V] logits over the input token ids [N, T] (T >= 2),
        every id below V: the next-token objective applies."""
        ids = self.ids
        return (
            ids is not None
            and out.ndim == 3
            and list(out.shape[:2]) == list(ids.shape)
            and ids.shape[1] >= 2
            and int(ids.min()) >= 0
            and int(ids.max()) < out.shape[2]
        )

    def _targets_are_inputs(self, y: torch.Tensor) -> bool:
        """The targets equal the input token ids wherever they are not ignored (-100)."""
        ids = self.ids
        if ids is None or list(y.shape) != list(ids.shape) or ids.shape[1] < 2:
            return False
        kept = y != IGNORE_INDEX
        return bool(kept.any()) and torch.equal(y[kept], ids.to(y.device, y.dtype)[kept])

    def _class_range(self, y: torch.Tensor, classes: int) -> None:
        """Refuse class targets outside [0, classes), the ignore index -100 aside."""
        kept = y[y != IGNORE_INDEX]
        if kept.numel() == 0:
            raise DataError(
                f"every target is the ignore index {IGNORE_INDEX}: nothing to take a loss of"
            )
        lo, hi = int(kept.min()), int(kept.max())
        if lo < 0 or hi >= classes:
            raise DataError(
                f"class targets range over [{lo}, {hi}] but the model outputs {classes} "
                "classes; check the labels or the output layer"
            )
        ignored = y.numel() - kept.numel()
        if ignored:
            self.notes.append(
                f"{ignored} of {y.numel()} targets are {IGNORE_INDEX}: ignored by the loss"
            )

    def _tokens(self, out: torch.Tensor, y: torch.Tensor, shift: bool, why: str) -> torch.Tensor:
        """Cross-entropy over every token of [N, ..., V] logits (class dimension last)
        against [N, ...] ids; ``shift``: position t predicts token t + 1."""
        if shift:
            out, y = out[:, :-1], y[:, 1:]
        classes = out.shape[-1]
        self._class_range(y, classes)
        self.description = f"cross-entropy, {why}"
        return F.cross_entropy(out.reshape(-1, classes), y.reshape(-1).long())

    def _ce(self, out: torch.Tensor) -> torch.Tensor:
        y = self.targets
        if out.ndim < 2:
            raise DataError(
                f"cross-entropy needs outputs with a class dimension, got {list(out.shape)}"
            )
        if y is None:
            if self.ids is not None and self._causal(out):
                if self.masked:
                    why = "per token (no targets: a masked LM reconstructs its input ids)"
                    return self._tokens(out, self.ids, False, why)
                why = "next token (no targets: the input ids shifted)"
                return self._tokens(out, self.ids, True, why)
            return self._random_classes(out)
        if y.is_floating_point():
            self.description = "cross-entropy (soft targets)"
            return F.cross_entropy(out, y.to(out.dtype))
        expected = [out.shape[0], *out.shape[2:]]
        if out.ndim >= 3 and list(y.shape) == list(out.shape[:-1]):
            if self._targets_are_inputs(y) and not self.masked:
                return self._tokens(out, y, True, "next token (targets = inputs shifted)")
            if list(y.shape) != expected:
                return self._tokens(out, y, False, "per token (class dimension last)")
        if list(y.shape) != expected:
            raise DataError(
                f"class targets of shape {list(y.shape)} do not fit outputs of shape "
                f"{list(out.shape)} (cross-entropy expects targets of shape {expected}, or "
                f"{list(out.shape[:-1])} for token logits with the vocabulary last)"
            )
        self._class_range(y, out.shape[1])
        self.description = "cross-entropy"
        return F.cross_entropy(out, y.long())

    def _random_classes(self, out: torch.Tensor) -> torch.Tensor:
        classes = out.shape[1]
        shape = (out.shape[0], *out.shape[2:])
        gen = self._gen(out.device)
        y = self._draw(
            shape, lambda s: torch.randint(0, classes, s, generator=gen, device=out.device)
        )
        self.description = f"cross-entropy against seeded random labels {NO_TARGETS}"
        self.notes.append(f"no targets: random class labels over {classes} classes (seeded)")
        return F.cross_entropy(out, y)

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
            lambda: self._draw(
                out.shape, lambda s: torch.randn(s, generator=gen, device=out.device)
            ).to(out.dtype),
            "regression to random unit-Gaussian targets",
        )
        self.description = (
            "mse" if self.targets is not None else f"mse against seeded random targets {NO_TARGETS}"
        )
        return F.mse_loss(out, y)

    def _bce(
        self, out: torch.Tensor, fn: Callable = F.binary_cross_entropy_with_logits
    ) -> torch.Tensor:
        gen = self._gen(out.device)
        y = self._float_targets(
            out,
            lambda: self._draw(
                out.shape, lambda s: torch.randint(0, 2, s, generator=gen, device=out.device)
            ).to(out.dtype),
            "random 0/1 targets",
        )
        if float(y.min()) < 0 or float(y.max()) > 1:
            raise DataError("bce targets must lie in [0, 1]")
        self.description = (
            "bce-with-logits"
            if self.targets is not None
            else f"bce-with-logits against seeded random 0/1 targets {NO_TARGETS}"
        )
        return fn(out, y)
