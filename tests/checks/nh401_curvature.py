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
