"""NH601 and NH103 on the designs of real architectures: pre-norm transformers at std
0.02, scale-invariant convs before BatchNorm, zeroed LayerNorm gains; hand-built
stand-ins first (torch only), then the stock models when their packages are installed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import HFLogits, small_bert
from torch import nn

import nnhealth
from nnhealth.analyzers._fixes import FixContext
from nnhealth.analyzers.init_scale import InitScale
from nnhealth.findings import Severity


def _scan(model, batch, codes=("NH601", "NH103"), **kwargs):
    return nnhealth.scan(model, batch, select=list(codes), **kwargs)


def _loud(report, code):
    return [f for f in report.findings if f.code == code and f.severity >= Severity.WARNING]


class PreNormBlock(nn.Module):
    """x + fc2(gelu(fc1(ln_2(x + proj(ln_1(x)))))), GPT-2's layout, every Linear at
    normal(0, std), then ln_f and a head."""

    def __init__(self, width: int = 64, depth: int = 2, std: float = 0.02, final_norm=True):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(width),
                    "proj": nn.Linear(width, width),
                    "ln_2": nn.LayerNorm(width),
                    "fc1": nn.Linear(width, 4 * width),
                    "fc2": nn.Linear(4 * width, width),
                }
            )
            self.blocks.append(block)
        self.ln_f = nn.LayerNorm(width) if final_norm else nn.Identity()
        self.head = nn.Linear(width, 10)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["proj"](b["ln_1"](x))
            x = x + b["fc2"](nn.functional.gelu(b["fc1"](b["ln_2"](x))))
        return self.head(self.ln_f(x).mean(dim=1))


def _tokens(n=8, t=16, width=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, t, width, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_pre_norm_std_002_is_one_info_naming_the_layers() -> None:
    report = _scan(PreNormBlock(), _tokens())
    assert not _loud(report, "NH601")
    absorbed = [f for f in report.findings if "resets the signal's scale" in f.message]
    (f,) = absorbed
    assert f.severity == Severity.INFO and f.evidence["layers"] == 2  # fc1 of both blocks
    assert "blocks.0.fc1" in f.message and "blocks.1.fc1" in f.message
    head = [f for f in report.findings if f.layer == "head"]
    assert head and head[0].severity == Severity.INFO


def test_deep_stack_reaching_the_output_still_fires() -> None:
    """The broken counterpart: the same std 0.02 with no normalization anywhere, in a
    plain 4-layer GELU stack, shrinks the signal that reaches the loss."""
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        lin = nn.Linear(256, 256)
        nn.init.normal_(lin.weight, 0.0, 0.02)
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
    (f,) = _loud(_scan(model, (x, y)), "NH601")
    assert f.severity == Severity.ERROR and f.layer == "0"
    # the formula's product against the tensors themselves
    expected = 1.0
    for i in range(4):
        w = model[2 * i].weight.detach().double()
        expected *= float(w.var(unbiased=False)) / (2 / 256)
    head = model[8].weight.detach().double()
    expected *= float(head.var(unbiased=False)) / (1 / 256)
    assert f.evidence["expected_change"] == pytest.approx(expected, rel=1e-6)
    # the measured change: E[y^2] at the output over the input's E[x^2] (the check reads
    # the input's from the first layer's output, exact only in expectation: 10%)
    with torch.no_grad():
        out = model(x)
    brute = float(out.double().pow(2).mean() / x.double().pow(2).mean())
    assert f.evidence["measured_change"] == pytest.approx(brute, rel=0.1)


def test_a_deep_head_after_the_norm_still_fires() -> None:
    """A small head is info up to two layers; three shrinking layers after the norm are
    a stack the formula judges."""
    torch.manual_seed(0)
    layers = [nn.Linear(128, 128), nn.LayerNorm(128)]
    for _ in range(3):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(128, 10))
    with torch.no_grad():
        for m in model[2:]:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.01)
                m.bias.zero_()
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(64, 128, generator=g), torch.randint(0, 10, (64,), generator=g))
    (f,) = _loud(_scan(model, batch), "NH601")
    assert f.layer == "2" and f.evidence["layers"] == 4


class ConvBN(nn.Module):
    """Conv-BN-ReLU x3, He (fan_out) init as torchvision, then a pooled Linear head."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        torch.manual_seed(0)
        chans = [3, 16, 32, 32]
        self.features = nn.Sequential()
        for a, b in itertools.pairwise(chans):
            conv = nn.Conv2d(a, b, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            self.features.extend([conv, nn.BatchNorm2d(b, eps=eps), nn.ReLU()])
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _images(n=16, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(factor)
    return model


def test_healthy_conv_bn_is_clean() -> None:
    assert not _loud(_scan(ConvBN(), _images()), "NH601")


def test_convs_scaled_before_batchnorm_report_the_step_and_fix_those_convs() -> None:
    model = _scaled(ConvBN(), 0.01)
    batch = _images()
    report = _scan(model, batch, codes=("NH601",), what_if=True)
    (f,) = _loud(report, "NH601")
    assert f.severity == Severity.WARNING and f.kind == "step"
    assert f.evidence["layers"] == 3
    assert (f.evidence["first_layer"], f.evidence["last_layer"]) == ("features.0", "features.6")
    assert "fc" not in f.fix_snippet and 'mode="fan_out"' in f.fix_snippet
    # step factor: He's mean square (nearer of 2/fan_in, 2/fan_out) over ||w||^2 / n
    factors = []
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach().double()
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            he = min(2 / fan_in, 2 / fan_out)
            factors.append(he / float(w.pow(2).mean()))
    assert f.evidence["min_step_factor"] == pytest.approx(min(factors), rel=1e-6)
    assert f.evidence["max_step_factor"] == pytest.approx(max(factors), rel=1e-6)
    # what-if: the fix re-initializes exactly the convs, and resolves the finding
    (tried,) = [w for w in report.what_if if w["code"] == "NH601"]
    assert tried["applied"] and tried["resolved"], tried
    copy = _scaled(ConvBN(), 0.01)
    fc_before = copy.fc.weight.detach().clone()
    ctx = FixContext.of(report, None, train=lambda *a, **k: (0.0, 0.0, ""))
    (fix,) = InitScale().fixes(f, ctx)
    assert fix.apply(copy) is None
    assert torch.equal(copy.fc.weight, fc_before)
    for m in copy.features:
        if isinstance(m, nn.Conv2d):
            assert float(m.weight.detach().pow(2).mean()) > 100 * 1e-4 * (2 / (m.weight[0].numel()))


def test_step_factor_is_the_ratio_of_effective_steps_by_brute_force() -> None:
    """With BatchNorm's eps out of the way the convs are exactly scale-invariant: one SGD
    step's relative change ||lr g|| / ||w|| grows as 1/c^2 when w is scaled by c, so the
    scaled model's relative step over the He model's is the step factor divided by the He
    model's own (He over its sampled mean square)."""
    batch = _images()
    rel = {}
    models = {"he": ConvBN(eps=1e-12), "scaled": _scaled(ConvBN(eps=1e-12), 0.01)}
    for name, model in models.items():
        conv = model.features[3]
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        (g,) = torch.autograd.grad(loss, conv.weight)
        rel[name] = float(g.double().norm() / conv.weight.detach().double().norm())
    report = _scan(models["scaled"], batch, codes=("NH601",))
    row = next(r for r in report.layers if r["name"] == "features.3")
    w = models["he"].features[3].weight.detach().double()
    he = min(2 / w[0].numel(), 2 / (w.shape[0] * w[0, 0].numel()))
    own = he / float(w.pow(2).mean())  # the He model's sampled weights against He itself
    assert row["init_step_factor"] == pytest.approx(rel["scaled"] / rel["he"] * own, rel=1e-3)


def test_extreme_scale_is_an_error() -> None:
    (f,) = _loud(_scan(_scaled(ConvBN(), 1e-4), _images()), "NH601")
    assert f.severity == Severity.ERROR and f.evidence["max_step_factor"] > 1e6


def test_residual_branch_into_a_norm_is_not_scale_invariant() -> None:
    """fc2 at std 1e-4 is one term of x + fc2(...) before the next LayerNorm: measured as
    a small share of the norm's input, not judged by its step (a post-norm BERT layer)."""

    class PostNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)
            self.ln = nn.LayerNorm(64)
            self.head = nn.Linear(64, 10)
            nn.init.normal_(self.fc2.weight, 0, 1e-4)

        def forward(self, x):
            x = self.ln(x + self.fc2(torch.relu(self.fc1(x))))
            return self.head(x.mean(dim=1))

    report = _scan(PostNorm(), _tokens())
    assert not [f for f in report.findings if f.kind == "step"]


def _state_dict_findings(cli, path) -> list[dict]:
    import json

    res = cli("scan", path, "--select", "NH601", "--format", "json", "--exit-zero")
    assert res.code == 0, res.err
    return json.loads(res.out)["findings"]


def test_state_dict_std_002_convention_is_info_but_a_plain_mlp_is_not(cli, tmp_path) -> None:
    torch.save(PreNormBlock(width=128, depth=3).state_dict(), tmp_path / "gpt.pt")
    found = _state_dict_findings(cli, tmp_path / "gpt.pt")
    assert [f["severity"] for f in found] == ["info"]
    assert "GPT-2/BERT/ViT" in found[0]["message"] and found[0]["evidence"]["layers"] == 10
    torch.manual_seed(0)
    mlp = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
    for m in mlp:
        nn.init.normal_(m.weight, 0, 0.02)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    found = _state_dict_findings(cli, tmp_path / "mlp.pt")
    assert [f["severity"] for f in found] == ["error"]


# ---- NH103: zero gains ---------------------------------------------------------------


def test_pre_norm_zero_gain_is_an_error_naming_the_norm_and_resolved() -> None:
    model = PreNormBlock()
    nn.init.zeros_(model.blocks[0]["ln_2"].weight)
    report = _scan(model, _tokens(), codes=("NH103",), what_if=True)
    (f,) = report.findings
    assert f.severity == Severity.ERROR and f.layer == "blocks.0.ln_2"
    assert f.evidence["consumer_weight_grad_norm"] == 0.0 and f.evidence["output_var"] == 0.0
    assert f.fix_snippet == 'nn.init.ones_(model.get_submodule("blocks.0.ln_2").weight)'
    (tried,) = report.what_if
    assert tried["applied"] and tried["resolved"]


def test_zero_final_norm_is_named() -> None:
    model = PreNormBlock()
    nn.init.zeros_(model.ln_f.weight)
    (f,) = _scan(model, _tokens(), codes=("NH103",)).findings
    assert f.severity == Severity.ERROR and f.layer == "ln_f"


def test_zero_gain_at_the_end_of_a_residual_branch_is_info() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)
            nn.init.zeros_(self.bn2.weight)

        def forward(self, x):
            x = self.stem(x)
            out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return self.fc(torch.relu(out + x).mean(dim=(2, 3)))

    (f,) = _scan(Block(), _images(), codes=("NH103",)).findings
    assert f.severity == Severity.INFO and f.layer == "bn2"


# ---- the stock models ----------------------------------------------------------------


def _quiet(model, batch):
    report = _scan(model, batch)
    loud = [(f.code, f.severity.label, f.layer, f.message) for f in report.findings]
    assert not [x for x in loud if x[1] != "info"], loud


def test_torchvision_models_are_clean_and_resnet_x001_is_found() -> None:
    tvm = pytest.importorskip("torchvision.models")
    x, y = _images(4, 32)
    torch.manual_seed(0)
    for build in (tvm.resnet18, tvm.convnext_tiny, tvm.mobilenet_v3_small):
        _quiet(build(num_classes=10), (x, y))
    model = _scaled(tvm.resnet18(num_classes=10), 0.01)
    report = _scan(model, (x, y), codes=("NH601",), what_if=True)
    (f,) = _loud(report, "NH601")
    assert f.kind == "step" and f.evidence["layers"] == 20
    assert f.evidence["min_step_factor"] == pytest.approx(1e4, rel=0.05)
    assert "fc" not in f.fix_snippet
    (tried,) = [w for w in report.what_if if w["code"] == "NH601"]
    assert tried["applied"] and tried["resolved"] and "20 layers" in tried["fix"]


def test_timm_models_are_clean() -> None:
    timm = pytest.importorskip("timm")
    x, y = _images(4, 64)
    torch.manual_seed(0)
    for name in ("vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"):
        kwargs = {"img_size": 64} if name.startswith("vit") else {}
        _quiet(timm.create_model(name, pretrained=False, num_classes=10, **kwargs), (x, y))


def _ids(vocab=100, classes=100):
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, vocab, (4, 16), generator=g), torch.randint(
        0, classes, (4,), generator=g
    )


def test_transformers_bert_is_clean() -> None:
    _quiet(HFLogits(small_bert(), last=False), _ids(classes=3))


@pytest.mark.parametrize("norm", ["ln_2", "ln_f"])
def test_transformers_gpt2_zero_gain(norm: str) -> None:
    tf = pytest.importorskip("transformers")
    config = tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    model = HFLogits(tf.GPT2LMHeadModel(config), last=True)
    _quiet(model, _ids())
    layer = model.m.transformer.h[0].ln_2 if norm == "ln_2" else model.m.transformer.ln_f
    nn.init.zeros_(layer.weight)
    report = _scan(model, _ids(), codes=("NH103",), what_if=True)
    (f,) = report.findings
    name = "m.transformer.h.0.ln_2" if norm == "ln_2" else "m.transformer.ln_f"
    assert f.severity == Severity.ERROR and f.layer == name
    assert report.what_if[0]["resolved"]
    assert math.isfinite(f.evidence["output_var"])
