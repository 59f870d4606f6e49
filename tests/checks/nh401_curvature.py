"""NH401 curvature: the learning rate against the 2/lambda_max stability limit. The
limit itself is checked against the dense Hessian and SGD in test_curvature.py."""

from __future__ import annotations

from conftest import TRANSFORMER_INPUTS, Case, TinyTransformer, he, stack
from torch import nn

from nnhealth.findings import Severity

CODE = "NH401"


def he_mlp64() -> nn.Module:
    return stack(64, 2, nn.ReLU, he)


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "he-relu-huge-lr"

BAD = [
    Case(
        "he-relu-huge-lr",
        he_mlp64,
        Severity.ERROR,
        None,
        inputs=(128, 64),
        kwargs=(("lr", 1e3),),
    ),
    Case("he-relu-no-lr", he_mlp64, Severity.INFO, None, inputs=(128, 64)),
    # --hessian-batches: the mean lambda_max over 6 sub-batches of 128 // 6 = 21 examples
    # (the last 2 in none), with its spread
    Case(
        "he-relu-huge-lr-6-sub-batches",
        he_mlp64,
        Severity.ERROR,
        None,
        inputs=(128, 64),
        kwargs=(("lr", 1e3), ("hessian_batches", 6)),
    ),
    # --hessian-batch: the sharpness of the first 32 examples
    Case(
        "he-relu-no-lr-first-32",
        he_mlp64,
        Severity.INFO,
        None,
        inputs=(128, 64),
        kwargs=(("hessian_batch", 32),),
    ),
]

# no small_cnn here: a Hessian product through its convolutions takes seconds on CPU
GOOD = [
    Case("he-relu-small-lr", he_mlp64, inputs=(128, 64), kwargs=(("lr", 1e-3),)),
    Case(
        "tiny-transformer",
        TinyTransformer,
        inputs=TRANSFORMER_INPUTS,
        kwargs=(("lr", 1e-3),),
    ),
]
