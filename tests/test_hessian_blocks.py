"""Hessian-vector products in blocks of the batch (curvature/blocks.py): the graph
rebuilt for each product, one block of examples at a time, when the whole batch's graph
is over its allowance.

Ground truth: the dense Hessian of the scan's loss on the whole batch, by
torch.autograd.functional.hessian over the flat parameters in float64; blocked products
must give it to 1e-10 of its largest entry (rounding of a few float64 sums). Where a
dense Hessian is out of reach (GPT-2 in float32), the products on the kept graph are the
reference, to 1e-4 of their norm (float32 sums in another order).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import state_of
from torch import nn
from torch.func import functional_call

import nnhealth
from nnhealth import memory
from nnhealth.curvature import blocks
from nnhealth.curvature.blocks import BlockedHessianOperator, graph_limit
from nnhealth.curvature.hvp import HessianOperator, NoCurvature
from nnhealth.loading.batch import Batch
from nnhealth.loading.loss import objective
from nnhealth.runner import hessian_examples

N = 10  # examples
EXACT = 1e-10  # of the dense Hessian's largest entry


def tanh_layernorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).double()


def conv_groupnorm() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()


class TinyCausal(nn.Module):
    """Token ids [N, T] to next-token logits [N, T, V]: the next-token objective."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + torch.tanh(self.mix(h.cumsum(1)))  # each position sees those before it
        return self.head(h)


def _batches() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(5)
    return {
        "tanh-layernorm": (
            tanh_layernorm(),
            torch.randn(N, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=g),
        ),
        # no targets: seeded random labels, each block's the whole draw's slice
        "conv-groupnorm-random-targets": (
            conv_groupnorm(),
            torch.randn(N, 2, 5, 5, generator=g, dtype=torch.float64),
            None,
        ),
        "next-token": (TinyCausal().double(), torch.randint(0, 11, (N, 7), generator=g), None),
    }


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, custom=None):
    """The scan's inputs, loss and blocks for (x, y)."""
    inputs, resolver = objective(model, x, y, "auto", 0, custom)
    whole = replace(Batch(inputs=inputs, targets=y, source="test"), targets=resolver.targets)
    return inputs, resolver, hessian_examples(whole, resolver)


def dense_hessian(model: nn.Module, inputs, resolver) -> torch.Tensor:
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        return resolver(functional_call(model, params, (inputs,)))

    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(loss, flat0)


def _forced(monkeypatch: pytest.MonkeyPatch, size: int) -> int:
    """The limit that makes the operator take blocks of ``size`` examples: one example's
    graph counted as 1 byte."""
    monkeypatch.setattr(BlockedHessianOperator, "_probe", lambda self: 1)
    return blocks.PEAK_FACTOR * size


def _products(op) -> torch.Tensor:
    return torch.stack([op.matvec(e) for e in torch.eye(op.n, dtype=torch.float64)])


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("case", sorted(_batches()))
def test_blocked_products_are_the_dense_hessian(case, size, monkeypatch) -> None:
    model, x, y = _batches()[case]
    inputs, resolver, examples = _loss(model, x, y)
    limit = _forced(monkeypatch, size)
    with BlockedHessianOperator(model, inputs, resolver, examples, limit) as op:
        assert op.blocks == -(-N // size) and op.block_examples == size  # 10 = 3+3+3+1
        blocked = _products(op)
        assert op.products == op.n
    truth = dense_hessian(model, inputs, resolver)
    assert (blocked - truth).abs().max() <= EXACT * truth.abs().max()


def test_gradient_is_the_batchs_and_can_be_asked_again(monkeypatch) -> None:
    model, x, y = _batches()["tanh-layernorm"]
    inputs, resolver, examples = _loss(model, x, y)
    params = list(model.parameters())
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(resolver(model(inputs)), params)])
    with BlockedHessianOperator(model, inputs, resolver, examples, _forced(monkeypatch, 3)) as op:
        first, again = op.gradient(), op.gradient()  # the second is computed anew
        assert op.loss == pytest.approx(float(resolver(model(inputs)).detach()), rel=1e-12)
    for g in (first, again):
        assert g.dtype == torch.float64
        assert (g - truth).abs().max() <= 1e-12 * truth.abs().max()


def test_products_with_dropout_match_the_kept_graph(monkeypatch) -> None:
    """Dropout is off for products: blocks and the kept graph see the same function."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double()
    _, x, y = _batches()["tanh-layernorm"]
    inputs, resolver, examples = _loss(model, x, y)
    with HessianOperator(model, inputs, resolver) as kept:
        reference = _products(kept)
    with BlockedHessianOperator(model, inputs, resolver, examples, _forced(monkeypatch, 2)) as op:
        assert op.blocks == 5
        assert model[1].p == 0.0  # its rate too, which attention kernels read
        blocked = _products(op)
    assert (blocked - reference).abs().max() <= EXACT * reference.abs().max()
    assert model[1].p == 0.5 and model[1].training  # restored


def batchnorm() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize(("mode", "blocked"), [("train", False), ("eval", True)])
def test_batchnorm_over_the_batch_keeps_the_whole_graph(mode, blocked, monkeypatch) -> None:
    """In train mode BatchNorm normalizes over the batch: blocks would change the
    Hessian, so the whole graph is kept; in eval mode it does not, and blocks are used."""
    model = batchnorm()
    _, x, y = _batches()["tanh-layernorm"]
    inputs, resolver, examples = _loss(model, x, y)
    limit = _forced(monkeypatch, 2)
    with BlockedHessianOperator(model, inputs, resolver, examples, limit, mode=mode) as op:
        assert (op.blocks > 1) is blocked
        products = _products(op)
    model.train(mode == "train")
    truth = dense_hessian(model, inputs, resolver)
    assert (products - truth).abs().max() <= EXACT * truth.abs().max()


def test_a_loss_that_is_not_a_mean_keeps_the_whole_graph(monkeypatch) -> None:
    """A summed loss is not the blocks' weighted mean: caught by the loss check before
    any product, and the whole graph is kept, with a note."""
    model, x, y = _batches()["tanh-layernorm"]

    def summed(out, target):
        return F.cross_entropy(out, target, reduction="sum")

    inputs, resolver, examples = _loss(model, x, y, custom=summed)
    with BlockedHessianOperator(model, inputs, resolver, examples, _forced(monkeypatch, 2)) as op:
        assert op.blocks == 1
        products = _products(op)
    assert any("not the batch's" in n and "whole batch's graph was kept" in n for n in op.notes)
    truth = dense_hessian(model, inputs, resolver)
    assert (products - truth).abs().max() <= EXACT * truth.abs().max()


def test_the_whole_graph_is_kept_when_it_fits() -> None:
    model, x, y = _batches()["tanh-layernorm"]
    inputs, resolver, examples = _loss(model, x, y)
    with BlockedHessianOperator(model, inputs, resolver, examples, 1 << 30) as op:
        assert op.blocks == 1 and op._grads is not None  # the kept graph
        assert not any("blocks" in n for n in op.notes)


def test_graph_limit_is_a_parameter_vector_within_a_floor_and_half_the_free_memory(
    monkeypatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "free_on", lambda device: None)
    assert graph_limit(1000, cpu) == blocks.GRAPH_FLOOR  # small models: the floor
    assert graph_limit(500_000_000, cpu) == 4_000_000_000  # one float64 vector
    monkeypatch.setattr(memory, "free_on", lambda device: 3_000_000_000)
    assert graph_limit(500_000_000, cpu) == 1_500_000_000  # half the free memory


def test_a_block_failing_in_a_later_product_is_no_curvature(monkeypatch) -> None:
    model, x, y = _batches()["tanh-layernorm"]
    inputs, resolver, examples = _loss(model, x, y)
    with BlockedHessianOperator(model, inputs, resolver, examples, _forced(monkeypatch, 5)) as op:
        op.matvec(torch.ones(op.n, dtype=torch.float64))

        def broken(module, args):
            raise RuntimeError("the forward changed its mind")

        handle = model[0].register_forward_pre_hook(broken)
        try:
            with pytest.raises(NoCurvature, match="the model's forward for Hessian products"):
                op.matvec(torch.ones(op.n, dtype=torch.float64))
        finally:
            handle.remove()


def test_probe_counts_one_examples_graph_without_weights_or_inputs() -> None:
    """The probe's bytes grow with the activations, not with the weights or the batch."""
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(50, 4), nn.Tanh(), nn.Linear(4, 3))
    wide = nn.Sequential(nn.Linear(50, 400), nn.Tanh(), nn.Linear(400, 3))
    x = torch.randn(64, 50)
    y = torch.randint(0, 3, (64,))
    sizes = {}
    for name, model in (("narrow", narrow), ("wide", wide)):
        inputs, resolver, examples = _loss(model, x, y)
        op = BlockedHessianOperator(model, inputs, resolver, examples, 1 << 30)
        sizes[name] = op._probe()
    # Linear -> tanh saves its output (and tanh's backward with graph saves more): at
    # least the 400 float32 hidden values, and far below the 20k-weight first layer
    assert 400 * 4 <= sizes["wide"] < 50 * 400 * 4
    assert sizes["narrow"] < sizes["wide"]


def _scan(model, x, y, **options):
    return nnhealth.scan(model, (x, y), hessian=True, hessian_tol=1e-8, **options).to_dict()


def test_scan_takes_products_in_blocks_when_the_graph_is_over_its_allowance(
    monkeypatch,
) -> None:
    """Through nnhealth.scan: a graph over one float64 parameter vector is taken in
    blocks (the floor set to 0 so that this small model has one), with the same lambda_max
    as the kept graph and the dense Hessian, the report says so, and the model is left
    as it was found."""
    model, x, y = _batches()["conv-groupnorm-random-targets"]
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(8))
    kept = _scan(model, x, y)["curvature"]
    assert kept["blocks"] == 1
    monkeypatch.setattr(blocks, "GRAPH_FLOOR", 0)
    before = state_of(model)
    report = _scan(model, x, y)
    after = state_of(model)
    for key in ("training", "requires_grad", "grad_ids", "hooks"):
        assert after[key] == before[key]
    for key in ("params", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(after[key], before[key], strict=True))
    assert all(g is None for g in after["grads"])
    curvature = report["curvature"]
    assert curvature["blocks"] > 1
    assert any("rebuilt the graph for each product" in n for n in report["notes"])
    inputs, resolver, _ = _loss(model, x, y)
    truth = float(torch.linalg.eigvalsh(dense_hessian(model, inputs, resolver))[-1])
    for c in (curvature, kept):
        assert abs(c["top_eigenvalues"][0] - truth) <= c["bounds"][0] + 1e-9 * abs(truth)


def test_sub_batches_are_taken_in_blocks_too(monkeypatch) -> None:
    model, x, y = _batches()["tanh-layernorm"]
    monkeypatch.setattr(blocks, "GRAPH_FLOOR", 0)
    monkeypatch.setattr(BlockedHessianOperator, "_probe", lambda self: 1 << 40)
    curvature = _scan(model, x, y, hessian_batch=6)["curvature"]
    assert curvature["blocks"] == 6 and curvature["examples"] == 6  # blocks of one
    inputs, resolver, _ = _loss(model, x[:6], y[:6])
    truth = float(torch.linalg.eigvalsh(dense_hessian(model, inputs, resolver))[-1])
    assert abs(curvature["top_eigenvalues"][0] - truth) <= curvature["bounds"][0] + 1e-9 * truth


def test_gpt2_products_in_blocks_match_the_kept_graph(monkeypatch) -> None:
    """A Hugging Face causal LM, keyword inputs and its own loss (labels= passed to the
    forward): blocks of one sequence give the kept graph's products."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs, resolver = objective(model, batch, ids, "auto", 0, None)
    whole = replace(Batch(inputs=batch, targets=ids, source="test"), targets=resolver.targets)
    examples = hessian_examples(whole, resolver)
    gen = torch.Generator().manual_seed(2)
    with HessianOperator(model, inputs, resolver) as kept:
        vs = [torch.randn(kept.n, generator=gen) for _ in range(3)]
        reference = [kept.matvec(v) for v in vs]
    assert "model's own loss" in resolver.description
    with BlockedHessianOperator(model, inputs, resolver, examples, _forced(monkeypatch, 1)) as op:
        assert op.blocks == 3, op.notes
        for v, ref in zip(vs, reference, strict=True):
            assert float((op.matvec(v) - ref).norm()) <= 1e-4 * float(ref.norm())
