"""--hessian-batch N (the Hessian of the first N examples) and --hessian-batches K (the
mean and spread of lambda_max over K disjoint sub-batches).

Ground truth: the dense Hessian of the loss on exactly those examples, by
torch.autograd.functional.hessian in float64, and numpy's mean and std over the
sub-batches' dense eigenvalues. A scan's eigenvalue is within its certified bound of the
dense one (plus 1e-9 relative for eigvalsh's own rounding).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error, state_of
from torch import nn
from torch.func import functional_call

import nnhealth
from nnhealth.errors import UsageError

B = 24  # examples in the batch
ROUNDING = 1e-9  # eigvalsh's relative rounding on these small float64 matrices
TIGHT = {"hessian_tol": 1e-8, "hessian_budget": 400}  # converges to the dense values


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()


def batchnorm() -> nn.Module:
    """BatchNorm in train mode: a sub-batch's Hessian is that of its own statistics."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()


MODELS = {"mlp": mlp, "batchnorm": batchnorm}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = 2 * torch.randn(B, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (B,), generator=gen)


def _loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The mean cross-entropy on (x, y) as a function of the flat parameters, on a copy
    of ``model`` in its mode (train: BatchNorm by the statistics of ``x``)."""
    ref = copy.deepcopy(model)
    named = list(ref.named_parameters())

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return F.cross_entropy(functional_call(ref, params, (x,)), y)

    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    return loss, flat0


def dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The dense Hessian's eigenvalues, ascending."""
    loss, flat0 = _loss_of(model, x, y)
    return np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat0).numpy())


def dense_adam_first_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """lambda_max of P^-1 H with Adam's first-step P = diag(|g| + eps), g the gradient
    on (x, y): the eigenvalues of D H D, D = P^-1/2."""
    loss, flat0 = _loss_of(model, x, y)
    g = torch.func.grad(loss)(flat0)
    d = (1 / (g.abs() + 1e-8)).sqrt()
    h = torch.autograd.functional.hessian(loss, flat0)
    return float(np.linalg.eigvalsh((d[:, None] * h * d[None, :]).numpy())[-1])


def within(value: float, true: float, bound: float) -> bool:
    return abs(value - true) <= bound + ROUNDING * abs(true)


def scan(model: nn.Module, data, **kw) -> nnhealth.Report:
    report = nnhealth.scan(model, data, select=["NH401"], **kw)
    assert report.curvature is not None, report.skipped
    return report


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_batch_is_the_hessian_of_the_first_n_examples(name: str) -> None:
    model = MODELS[name]()
    x, y = batch()
    c = scan(model, (x, y), hessian_batch=8, hessian_top=2, hessian_min=True).curvature
    sub, whole = dense(model, x[:8], y[:8]), dense(model, x, y)
    assert within(c["top_eigenvalues"][0], sub[-1], c["bounds"][0])
    assert within(c["top_eigenvalues"][1], sub[-2], c["bounds"][1])
    assert within(c["lambda_min"], sub[0], c["lambda_min_bound"])
    # the sub-batch's sharpness is not the batch's: the test tells them apart
    assert abs(sub[-1] - whole[-1]) > 10 * c["bounds"][0]
    assert (c["examples"], c["batches"], c["batch_lambda_max"]) == (8, 1, [])


@pytest.mark.parametrize("name", list(MODELS))
def test_k_sub_batches_each_against_the_dense_hessian_and_their_mean_and_spread(
    name: str,
) -> None:
    model = MODELS[name]()
    x, y = batch()
    k, n = 3, 6  # examples 0:18 of 24
    report = scan(model, (x, y), hessian_batches=k, hessian_batch=n, hessian_top=2, **TIGHT)
    c = report.curvature
    spectra = [dense(model, x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]) for i in range(k)]
    tops = np.array([s[-1] for s in spectra])
    # each sub-batch's bound is at most the sum of the K bounds, K times their mean
    for value, true in zip(c["batch_lambda_max"], tops, strict=True):
        assert within(value, true, k * c["bounds"][0])
    assert within(c["top_eigenvalues"][0], tops.mean(), c["bounds"][0])
    assert within(c["top_eigenvalues"][1], np.mean([s[-2] for s in spectra]), c["bounds"][1])
    assert (c["examples"], c["batches"]) == (n, k)
    (finding,) = report.findings
    ev = finding.evidence
    assert ev["lambda_max_std"] == pytest.approx(np.std(tops, ddof=1), rel=1e-6)
    assert ev["lambda_max_min"] == pytest.approx(tops.min(), rel=1e-6)
    assert ev["lambda_max_max"] == pytest.approx(tops.max(), rel=1e-6)
    assert (ev["examples"], ev["batches"]) == (n, k)
    assert f"over {k} sub-batches of {n} examples" in finding.message
    assert f"± {np.std(tops, ddof=1):.2g}" in finding.message


@pytest.mark.parametrize("name", list(MODELS))
def test_each_sub_batch_is_measured_as_a_scan_of_its_examples_alone(name: str) -> None:
    """Without --hessian-batch, K sub-batches of batch // K: each sub-batch's lambda_max,
    products and trace are those of a scan of its examples alone (the same operator,
    seed and start), and the mean trace's stderr is that of a mean of K estimates."""
    model = MODELS[name]()
    x, y = batch()
    k, n = 4, B // 4
    c = scan(model, (x, y), hessian_batches=k, hessian_trace=6).curvature
    alone = [
        scan(model, (x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]), hessian_trace=6).curvature
        for i in range(k)
    ]
    assert c["batch_lambda_max"] == pytest.approx([a["top_eigenvalues"][0] for a in alone])
    assert c["hvps"] == sum(a["hvps"] for a in alone)  # every product counted
    assert c["lanczos_hvps"] == sum(a["lanczos_hvps"] for a in alone)
    assert c["trace"] == pytest.approx(np.mean([a["trace"] for a in alone]))
    stderr = math.sqrt(sum(a["trace_stderr"] ** 2 for a in alone)) / k
    assert c["trace_stderr"] == pytest.approx(stderr)
    assert c["bounds"][0] == pytest.approx(np.mean([a["bounds"][0] for a in alone]))
    assert c["converged"] is all(a["converged"] for a in alone)
    assert c["examples"] == n


def test_the_preconditioner_is_each_sub_batchs_own() -> None:
    """Adam's first step on a sub-batch is preconditioned by that sub-batch's gradient:
    each sub-batch's lambda_max(P^-1 H) is the dense one with P from its own gradient,
    not the whole batch's."""
    model = mlp()
    x, y = batch()
    k, n = 2, B // 2
    c = scan(model, (x, y), optimizer="adam", lr=1e-3, hessian_batches=k, **TIGHT).curvature
    assert c["operator"] == "preconditioned"
    for i, value in enumerate(c["batch_lambda_max"]):
        part = slice(i * n, (i + 1) * n)
        true = dense_adam_first_step(model, x[part], y[part])
        assert value == pytest.approx(true, rel=1e-6)
        # P from the whole batch's gradient would give another value
        loss_part, flat0 = _loss_of(model, x[part], y[part])
        loss_all, _ = _loss_of(model, x, y)
        d = (1 / (torch.func.grad(loss_all)(flat0).abs() + 1e-8)).sqrt()
        h = torch.autograd.functional.hessian(loss_part, flat0)
        other = float(np.linalg.eigvalsh((d[:, None] * h * d[None, :]).numpy())[-1])
        assert abs(other - true) > 1e-3 * true


def test_the_model_is_left_as_found() -> None:
    model = batchnorm()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = state_of(model)
    x, y = batch()
    scan(model, (x, y), hessian_batches=3, hessian_trace=2, hessian_min=True)
    after = state_of(model)
    for key in ("training", "requires_grad", "grad_ids", "hooks"):
        assert after[key] == before[key], key
    for key in ("params", "buffers"):
        for a, b in zip(after[key], before[key], strict=True):
            assert torch.equal(a, b), key
    assert torch.equal(after["grads"][0], before["grads"][0])
    assert all(g is None for g in after["grads"][1:])


def test_token_ids_without_targets_are_the_sub_batchs() -> None:
    """The next-token objective on a sub-batch reads that sub-batch's token ids."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Tanh(), nn.Linear(6, 11)).double()
    ids = torch.randint(0, 11, (12, 5), generator=torch.Generator().manual_seed(2))
    c = scan(model, ids, hessian_batch=4).curvature
    alone = scan(model, ids[:4]).curvature
    assert c["top_eigenvalues"] == pytest.approx(alone["top_eigenvalues"])
    assert c["examples"] == 4


def test_random_targets_of_a_sub_batch_are_the_pass_s() -> None:
    """No targets: the loss draws seeded random labels for the whole batch (seed + 1),
    and each sub-batch's loss uses its slice of that draw, not a draw of its own."""
    model = mlp()
    x, _ = batch()
    drawn = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(1))
    c = scan(model, x, hessian_batches=2, **TIGHT).curvature
    for i, value in enumerate(c["batch_lambda_max"]):
        part = slice(i * B // 2, (i + 1) * B // 2)
        assert within(value, dense(model, x[part], drawn[part])[-1], 2 * c["bounds"][0])
    own = dense(model, x[B // 2 :], drawn[: B // 2])[-1]  # a draw of its own: another value
    assert abs(own - c["batch_lambda_max"][1]) > 1e-3 * own


def test_the_whole_batch_by_default_and_when_n_is_the_batch() -> None:
    model = mlp()
    data = batch()
    default = scan(model, data).curvature
    full = scan(model, data, hessian_batch=B).curvature
    assert default == full
    assert (default["examples"], default["batches"], default["batch_lambda_max"]) == (B, 1, [])


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    torch.save(mlp(), tmp_path / "model.pt")
    torch.save(batch(), tmp_path / "batch.pt")
    return tmp_path / "model.pt", tmp_path / "batch.pt"


def test_cli_text_and_json_say_n_and_k(cli, files) -> None:
    model, data = files
    base = ("scan", model, "--data", data, "--hessian", "--select", "NH401")
    res = cli(*base, "--hessian-batch", "8")
    assert res.code == 0, res.err
    assert "on the first 8 of 24 examples" in res.out
    res = cli(*base, "--hessian-batches", "3", "--lr", "100", "--format", "json")
    assert res.code == 1, res.err  # lr far above the limit: an error finding
    report = json.loads(res.out)
    c = report["curvature"]
    assert (c["examples"], c["batches"], len(c["batch_lambda_max"])) == (8, 3, 3)
    assert c["top_eigenvalues"][0] == pytest.approx(np.mean(c["batch_lambda_max"]))
    (finding,) = report["findings"]
    assert finding["severity"] == "error"
    assert (finding["evidence"]["examples"], finding["evidence"]["batches"]) == (8, 3)
    assert "over 3 sub-batches of 8 examples" in finding["message"]
    res = cli(*base, "--hessian-batches", "3")
    assert res.code == 0, res.err
    std = float(np.std(c["batch_lambda_max"], ddof=1))
    assert f"mean over 3 sub-batches of 8: λmax ± {std:.2g}" in res.out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--hessian-batch", "0"), "--hessian-batch 0: expected an integer in [1,"),
        (("--hessian-batches", "0"), "--hessian-batches 0: expected an integer in [1,"),
        (("--hessian-batch", "x"), "--hessian-batch"),
        (("--hessian-batch", "25"), "--hessian-batch 25: the batch has 24 examples"),
        (("--hessian-batches", "25"), "--hessian-batches 25: the batch has 24 examples"),
        (
            ("--hessian-batch", "9", "--hessian-batches", "3"),
            "--hessian-batches 3 x --hessian-batch 9 = 27 examples: the batch has 24",
        ),
    ],
)
def test_bad_values_exit_2_with_one_line(cli, files, args, needle) -> None:
    model, data = files
    line = one_line_error(cli("scan", model, "--data", data, "--hessian", *args))
    assert needle in line


def test_bad_values_through_scan_name_the_keyword() -> None:
    model, data = mlp(), batch()
    with pytest.raises(UsageError, match=r"^hessian_batches 0: expected an integer"):
        nnhealth.scan(model, data, hessian=True, hessian_batches=0)
    with pytest.raises(UsageError, match=r"^hessian_batch 2\.5: expected an integer"):
        nnhealth.scan(model, data, hessian=True, hessian_batch=2.5)
    with pytest.raises(UsageError, match=r"^hessian_batch 30: the batch has 24 examples"):
        nnhealth.scan(model, data, hessian=True, hessian_batch=30)
    with pytest.raises(UsageError, match=r"^hessian_batches 5 x hessian_batch 5 = 25"):
        nnhealth.scan(model, data, hessian=True, hessian_batch=5, hessian_batches=5)


def test_without_the_hessian_they_have_no_effect_like_the_other_hessian_options() -> None:
    """As --hessian-top: a sub-batch larger than the batch is not refused when no
    Hessian is measured (a config file may set it for the runs that do)."""
    model, data = mlp(), batch()
    report = nnhealth.scan(model, data, hessian_batch=1000, hessian_batches=50, hessian_top=9)
    assert report.curvature is None
    assert "NH401" not in report.run["checks"]


def test_a_sub_batch_that_cannot_be_measured_skips_nh401_naming_it() -> None:
    """BatchNorm in train mode cannot normalize one example: NH401 is skipped with the
    reason, naming the sub-batch; the scan goes on."""
    report = nnhealth.scan(batchnorm(), batch(), select=["NH401"], hessian_batches=B)
    assert report.curvature is None
    (skipped,) = report.skipped
    assert skipped.reason.startswith(f"sub-batch 1 of {B} (1 examples): ")
    assert "Expected more than 1 value per channel" in skipped.reason
