"""Language models: the model's own loss (labels passed through), token-level and
next-token cross-entropy, and a run header that names the objective and why."""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth
from nnhealth.errors import DataError
from nnhealth.loading.loss import LossResolver, objective, primary_output

VOCAB, N, T = 11, 3, 7
REL = 1e-6


def ids_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(seed))


class TinyLM(nn.Module):
    """Embedding -> Linear: [N, T] ids to [N, T, V] logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids):
        return self.head(self.emb(input_ids))


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Brute force: the mean over every (example, position) of -log p(ids[t+1])."""
    logp = logits.double().log_softmax(-1)
    terms = [
        -float(logp[n, t, int(ids[n, t + 1])])
        for n in range(ids.shape[0])
        for t in range(ids.shape[1] - 1)
        if int(ids[n, t + 1]) != -100
    ]
    return sum(terms) / len(terms)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL)


@dataclass
class Output:
    """A ModelOutput-like result that is not a dict: .loss and .logits attributes."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LabelledLM(TinyLM):
    """forward(input_ids, labels=None) computing its own (shifted) loss when given
    labels; ``style`` picks the output: dict, object, HF tuple (loss, logits) or nanoGPT
    (logits, loss). Records whether each call had labels."""

    def __init__(self, style: str = "dict") -> None:
        super().__init__()
        self.style, self.seen = style, []

    def forward(self, input_ids, labels=None):
        return self.forward_labels(input_ids, labels)

    def forward_labels(self, input_ids, labels):
        self.seen.append(labels is not None)
        logits = self.head(self.emb(input_ids))
        loss = None
        if labels is not None:
            # a deliberately different weighting from the mean, to tell it from ours
            loss = 2.0 * F.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
            )
        if self.style == "dict":
            return {"logits": logits, "loss": loss} if loss is not None else {"logits": logits}
        if self.style == "object":
            return Output(logits, loss)
        if self.style == "hf-tuple":
            return (loss, logits) if loss is not None else (logits,)
        return logits, loss  # nanoGPT


class TargetsLM(LabelledLM):
    """nanoGPT's signature: forward(idx, targets=None)."""

    def forward(self, idx, targets=None):
        return self.forward_labels(idx, targets)


# ---- the next-token objective and token-level cross-entropy ---------------------------


def test_ids_only_is_next_token_cross_entropy() -> None:
    model, ids = TinyLM(), ids_batch()
    report = nnhealth.scan(model, ids)
    assert report.run["loss"] == "cross-entropy, next token (no targets: the input ids shifted)"
    assert report.run["output_shape"] == [N, T, VOCAB]
    with torch.no_grad():
        assert close(report.run["loss_value"], next_token_ce(model(ids), ids))


def test_targets_equal_to_inputs_are_shifted() -> None:
    model, ids = TinyLM(), ids_batch()
    report = nnhealth.scan(model, (ids, ids.clone()))  # equal, not the same tensor
    assert report.run["loss"] == "cross-entropy, next token (targets = inputs shifted)"
    with torch.no_grad():
        assert close(report.run["loss_value"], next_token_ce(model(ids), ids))


def test_other_token_targets_are_not_shifted() -> None:
    model, ids, y = TinyLM(), ids_batch(0), ids_batch(1)  # e.g. already shifted (nanoGPT)
    report = nnhealth.scan(model, (ids, y))
    assert report.run["loss"] == "cross-entropy, per token (class dimension last)"
    with torch.no_grad():
        logp = model(ids).double().log_softmax(-1)
    brute = -sum(float(logp[n, t, int(y[n, t])]) for n in range(N) for t in range(T)) / (N * T)
    assert close(report.run["loss_value"], brute)


def test_ignored_positions_still_read_as_the_inputs() -> None:
    model, ids = TinyLM(), ids_batch()
    y = ids.clone()
    y[:, -2:] = -100  # padding labels, as Hugging Face collators write them
    report = nnhealth.scan(model, (ids, y))
    assert report.run["loss"] == "cross-entropy, next token (targets = inputs shifted)"
    assert any(f"{2 * N} of {N * (T - 1)} targets are -100" in n for n in report.notes)
    with torch.no_grad():
        assert close(report.run["loss_value"], next_token_ce(model(ids), y))


@pytest.mark.parametrize(
    "bad,match",
    [(-1, r"range over \[-1,"), (VOCAB, rf"range over \[0, {VOCAB}\]"), ("all", "ignore index")],
)
def test_bad_token_targets_still_refused(bad, match: str) -> None:
    y = ids_batch(1)
    if bad == "all":
        y[:] = -100
    else:
        y[0, 3] = bad
    with pytest.raises(DataError, match=match):
        nnhealth.scan(TinyLM(), (ids_batch(0), y))


def test_segmentation_keeps_the_class_dimension_first() -> None:
    out = torch.randn(2, 5, 4, 4)
    y = torch.randint(0, 5, (2, 4, 4))
    r = LossResolver("auto", y, 0, inputs=torch.randn(2, 3, 4, 4))
    assert torch.equal(r(out), F.cross_entropy(out, y)) and r.description == "cross-entropy"


def test_float_sequence_without_targets_says_random() -> None:
    r = LossResolver("auto", None, 0, inputs=torch.randn(4, 6, 3))
    out = torch.randn(4, 6, 8)
    assert torch.isfinite(r(out))
    assert r.description == "mse against seeded random targets (no targets given)"
    # ids that do not fit the logits (one position only): no next-token objective
    r = LossResolver("auto", None, 0, inputs=ids_batch())
    r(torch.randn(N, 1, VOCAB))
    assert r.description.startswith("mse against seeded random targets")


def test_classifier_without_targets_says_random_labels() -> None:
    r = LossResolver("auto", None, 0, inputs=torch.randn(10, 3))
    r(torch.randn(10, 4))
    assert r.description == "cross-entropy against seeded random labels (no targets given)"
    r = LossResolver("bce", None, 0)
    r(torch.randn(10, 4))
    assert r.description == "bce-with-logits against seeded random 0/1 targets (no targets given)"


def test_explicit_ce_on_token_logits_without_targets_is_next_token() -> None:
    model, ids = TinyLM(), ids_batch()
    report = nnhealth.scan(model, ids, loss="ce")
    assert report.run["loss"].startswith("cross-entropy, next token")
    report = nnhealth.scan(model, ids, loss="mse")  # the override stands, and says so
    assert report.run["loss"] == "mse against seeded random targets (no targets given)"


# ---- the model's own loss ------------------------------------------------------------


@pytest.mark.parametrize(
    "style,keyword,where",
    [
        ("dict", "labels", "output['loss']"),
        ("object", "labels", "output.loss"),
        ("hf-tuple", "labels", "output[0]"),
        ("nanogpt", "targets", "output[1]"),
    ],
)
def test_labels_passed_through_and_own_loss_used(style: str, keyword: str, where: str) -> None:
    model, ids = (TargetsLM if keyword == "targets" else LabelledLM)(style), ids_batch()
    batch = {("idx" if keyword == "targets" else "input_ids"): ids, "labels": ids}
    report = nnhealth.scan(model, batch)
    assert (
        report.run["loss"] == f"the model's own loss ({where}, from {keyword}= passed to forward)"
    )
    assert report.run["output_shape"] == [N, T, VOCAB]
    assert model.seen and all(model.seen)
    with torch.no_grad():
        own = 2.0 * next_token_ce(model.head(model.emb(ids)), ids)
    assert close(report.run["loss_value"], own)
    assert report.run["batch"]["targets_shape"] == [N, T]


def test_labels_stay_targets_when_forward_does_not_take_them() -> None:
    model, ids = TinyLM(), ids_batch()
    report = nnhealth.scan(model, {"input_ids": ids, "labels": ids})
    assert report.run["loss"] == "cross-entropy, next token (targets = inputs shifted)"
    with torch.no_grad():
        assert close(report.run["loss_value"], next_token_ce(model(ids), ids))


@pytest.mark.parametrize("loss", ["ce", "custom"])
def test_labels_not_passed_when_the_loss_is_chosen(loss: str) -> None:
    model, ids = LabelledLM("dict"), ids_batch()
    batch = {"input_ids": ids, "labels": ids}
    if loss == "custom":

        def token_ce(output, targets):
            return F.cross_entropy(output["logits"].reshape(-1, VOCAB), targets.reshape(-1))

        report = nnhealth.scan(model, batch, loss_fn=token_ce)
        assert report.run["loss"] == "custom (token_ce)"
    else:
        report = nnhealth.scan(model, batch, loss="ce")
        assert report.run["loss"] == "cross-entropy, next token (targets = inputs shifted)"
    assert model.seen and not any(model.seen)


def test_own_loss_without_a_gradient_is_not_used() -> None:
    class Detached(TinyLM):
        def forward(self, input_ids):
            logits = self.head(self.emb(input_ids))
            return {"logits": logits, "loss": torch.tensor(0.0)}

    model, ids = Detached(), ids_batch()
    report = nnhealth.scan(model, ids)
    assert report.run["loss"].startswith("cross-entropy, next token")
    assert any(
        "own loss (output['loss']) is not a differentiable scalar" in n for n in report.notes
    )


def test_passed_labels_without_a_loss_in_the_output_fall_back() -> None:
    class Ignores(TinyLM):
        def forward(self, input_ids, labels=None):
            return self.head(self.emb(input_ids))

    report = nnhealth.scan(Ignores(), {"input_ids": ids_batch(), "labels": ids_batch()})
    assert report.run["loss"] == "cross-entropy, next token (targets = inputs shifted)"
    assert any("passed to the model as labels=" in n for n in report.notes)


def test_an_unnamed_scalar_is_not_taken_for_the_loss_without_labels() -> None:
    """(logits, aux) from a model given no labels: the scalar may be an auxiliary loss."""

    class Aux(TinyLM):
        def forward(self, input_ids):
            logits = self.head(self.emb(input_ids))
            return logits, logits.pow(2).mean()

    model, ids = Aux(), ids_batch()
    report = nnhealth.scan(model, ids)
    assert report.run["loss"].startswith("cross-entropy, next token")
    with torch.no_grad():
        assert close(report.run["loss_value"], next_token_ce(model(ids)[0], ids))


def test_primary_output_picks_the_logits() -> None:
    logits = torch.randn(2, 3)
    assert primary_output((torch.tensor(1.0), logits)) is logits
    assert primary_output(Output(logits, torch.tensor(1.0))) is logits
    assert primary_output({"loss": torch.tensor(1.0), "logits": logits}) is logits
    assert primary_output({"a": logits}) is logits
    with pytest.raises(DataError, match="no tensor"):
        primary_output({"a": 1})


def test_objective_passes_labels_only_to_a_forward_that_names_them() -> None:
    ids = ids_batch()
    inputs, r = objective(LabelledLM(), {"input_ids": ids}, ids, "auto", 0)
    assert set(inputs) == {"input_ids", "labels"} and r.labels_key == "labels"

    class Kwargs(nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    inputs, r = objective(Kwargs(), {"input_ids": ids}, ids, "auto", 0)
    assert set(inputs) == {"input_ids"} and r.labels_key is None
    inputs, r = objective(LabelledLM(), ids, ids, "auto", 0)  # positional: targets stay
    assert inputs is ids and r.labels_key is None


def test_hessian_and_what_if_call_the_model_the_same_way() -> None:
    from nnhealth.loading.batch import interpret
    from nnhealth.loading.model import LoadedModel
    from nnhealth.optim import Optimizer
    from nnhealth.options import ScanOptions
    from nnhealth.whatif import _train_check

    model, ids = LabelledLM("dict"), ids_batch()
    batch = {"input_ids": ids, "labels": ids}
    report = nnhealth.scan(model, batch, hessian=True, hessian_budget=20)
    assert report.curvature is not None and not report.errors
    assert model.seen and all(model.seen)
    model.seen.clear()
    loaded = LoadedModel(model=model, format="in-memory module", source="m", loss_fn=None)
    before, after, _ = _train_check(
        model, interpret(batch, "b"), ScanOptions(), loaded, Optimizer(lr=0.1), 0.1, 0.1, False
    )
    assert model.seen and all(model.seen)
    assert math.isfinite(before) and math.isfinite(after)


# ---- the CLI: a factory file and a dict batch ----------------------------------------

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding({vocab}, 16)
            self.head = nn.Linear(16, {vocab})

        def forward(self, input_ids, labels=None):
            logits = self.head(self.emb(input_ids))
            if labels is None:
                return {{"logits": logits}}
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, {vocab}), labels[:, 1:].reshape(-1))
            return {{"logits": logits, "loss": loss}}

    def make():
        return LM()
    """
).format(vocab=VOCAB)


def scan_json(cli, *args) -> dict:
    res = cli("scan", *args, "--format", "json")
    assert res.code in (0, 1), res.err
    return json.loads(res.out)


def test_cli_factory_with_a_dict_batch(cli, tmp_path: Path) -> None:
    (tmp_path / "lm.py").write_text(FACTORY)
    ids = ids_batch()
    torch.save({"input_ids": ids, "labels": ids}, tmp_path / "b.pt")
    torch.save(ids, tmp_path / "ids.pt")
    entry = f"{tmp_path / 'lm.py'}:make"
    run = scan_json(cli, entry, "--data", tmp_path / "b.pt")["run"]
    assert run["loss"] == "the model's own loss (output['loss'], from labels= passed to forward)"
    ours = scan_json(cli, entry, "--data", tmp_path / "ids.pt")["run"]
    assert ours["loss"] == "cross-entropy, next token (no targets: the input ids shifted)"
    assert close(run["loss_value"], ours["loss_value"])
    text = cli("scan", entry, "--data", tmp_path / "ids.pt").out
    assert "loss cross-entropy, next token (no targets: the input ids shifted) =" in text


# ---- Hugging Face models -------------------------------------------------------------

GPT2_CONFIG = "n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32"


def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    )


def bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def hf_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("form", ["pair", "ids", "dict"])
def test_gpt2_loss_is_its_own(form: str) -> None:
    model, ids = gpt2(), hf_ids()
    batch = {"pair": (ids, ids), "ids": ids, "dict": {"input_ids": ids, "labels": ids}}[form]
    report = nnhealth.scan(model, batch, mode="eval")  # no dropout: one loss to compare
    expected = {
        "pair": "cross-entropy, next token (targets = inputs shifted)",
        "ids": "cross-entropy, next token (no targets: the input ids shifted)",
        "dict": "the model's own loss (output.loss, from labels= passed to forward)",
    }[form]
    assert report.run["loss"] == expected
    assert report.run["output_shape"] == [2, 16, 100]
    model.eval()
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)
        brute = next_token_ce(model(input_ids=ids).logits, ids)
    assert close(report.run["loss_value"], hf_loss) and close(hf_loss, brute)


@pytest.mark.parametrize("form", ["pair", "dict"])
def test_bert_classifier_loss(form: str) -> None:
    model, ids = bert(), hf_ids()
    y = torch.tensor([0, 2])
    batch = (
        (ids, y)
        if form == "pair"
        else {"input_ids": ids, "attention_mask": ids * 0 + 1, "labels": y}
    )
    report = nnhealth.scan(model, batch, mode="eval")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert close(report.run["loss_value"], float(F.cross_entropy(logits, y)))
    own = "the model's own loss (output.loss, from labels= passed to forward)"
    assert report.run["loss"] == ("cross-entropy" if form == "pair" else own)


def test_gpt2_from_the_cli(cli, tmp_path: Path) -> None:
    model, ids = gpt2(), hf_ids()
    (tmp_path / "zoo.py").write_text(
        "import torch, transformers\n\n"
        "def gpt2():\n"
        "    torch.manual_seed(0)\n"
        f"    return transformers.GPT2LMHeadModel(transformers.GPT2Config({GPT2_CONFIG}))\n"
    )
    torch.save({"input_ids": ids, "labels": ids}, tmp_path / "b.pt")
    run = scan_json(
        cli, f"{tmp_path / 'zoo.py'}:gpt2", "--data", tmp_path / "b.pt", "--mode", "eval"
    )["run"]
    assert run["loss"] == "the model's own loss (output.loss, from labels= passed to forward)"
    model.eval()
    with torch.no_grad():
        assert close(run["loss_value"], float(model(input_ids=ids, labels=ids).loss))


def test_masked_lm_is_not_shifted() -> None:
    """A masked LM predicts token t from the whole sequence: targets equal to the inputs
    (or none) are scored per token, never as the next token."""
    from nnhealth.loading.loss import objective

    class TinyForMaskedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = TinyForMaskedLM()
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    expected = F.cross_entropy(logits.reshape(-1, 20).double(), ids.reshape(-1)).item()
    for targets in (ids, None):
        inputs, resolver = objective(model, ids, targets, "auto", 0)
        loss = resolver(model(inputs)).item()
        assert loss == pytest.approx(expected, rel=1e-6)
        assert "per token" in resolver.description and "next" not in resolver.description
