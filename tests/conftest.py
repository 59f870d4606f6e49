from __future__ import annotations

import importlib.util
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, grad, jacrev

import nnhealth
from nnhealth.findings import Finding, Report, Severity, Skipped

ROOT = Path(__file__).resolve().parents[1]
NUMBER = (int, float)
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(SAMPLES))  # make_samples, to rebuild the samples in memory


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite tests/golden/* from the current output",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``nnhealth ARGS`` in-process; returns exit code, stdout and stderr."""
    from nnhealth.cli import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def he_mlp(sizes: list[int], act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# the findings of each shipped sample model (test_samples, test_whatif)
SAMPLE_FINDINGS = {
    # sample name: {code: (severity, layer or None)}: every finding its scan must report
    "healthy_relu_mlp": {},
    "cnn_bn": {},
    # a chain that only shrinks the signal: every layer's sensitivity ||y||^2 ||dL/dy||^2
    # is the same, so NH202 is silent and NH201 names the collapse
    "tanh_vanishing": {"NH201": ("error", None), "NH601": ("error", "0")},
    "tanh_saturated": {
        "NH102": ("error", "1"),
        "NH202": ("error", None),
        "NH601": ("error", "0"),
    },
    "sigmoid_large": {"NH102": ("error", "1"), "NH601": ("error", "0")},
    "relu_dead_bias": {"NH101": ("error", "3")},
    "zero_init_mlp": {
        "NH101": ("error", "1"),
        "NH201": ("error", None),
        "NH202": ("error", None),
        "NH501": ("error", "0"),
        "NH601": ("error", "0"),
    },
    "nan_weight": {"NH001": ("error", "2")},
    "duplicated_units": {"NH501": ("warning", "2")},
    "xavier_deep_relu": {
        "NH601": ("warning", "0"),
        "NH201": ("warning", None),
        "NH101": ("warning", "19"),
    },
    # the x100 Linear before BatchNorm: 1e-4 of the others' effective step (NH601, NH301)
    "norm_spread_bn": {"NH301": ("warning", None), "NH601": ("warning", "3")},
}


@pytest.fixture
def sample():
    """``sample(name)`` -> (model path, batch path) of a committed sample model."""

    def get(name: str) -> tuple[Path, Path]:
        return SAMPLES / f"{name}.pt", SAMPLES / f"{name}.batch.pt"

    return get


class WritesOnLoad(nn.Module):
    """A TorchScript module whose __setstate__ (run by torch.jit.load) creates the file
    ``marker`` through torch.from_file(path, shared=True, size): TorchScript is code,
    and no file of it may be loaded without --trust (test_hostile_loading,
    test_fuzz_loaders)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.path = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.path, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        self.w = state[1] + torch.from_file(self.path, True, 2) * 0


def one_line_error(res) -> str:
    assert res.code == 2, (res.code, res.out, res.err)
    assert res.out == ""
    assert "Traceback" not in res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    return lines[0]


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def upstream_symmetry() -> nn.Module:
    """Units 0 and 1 of layer 2 differ only on weights from dead units of layer 1: their
    outputs are identical over any batch, though their weight rows are not."""
    model = stack(128, 3, nn.ReLU, he)
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # units 0..7 of layer 1 are dead
        model[2].weight[1] = model[2].weight[0]
        model[2].bias[1] = model[2].bias[0]
        model[2].weight[1, :8] += 1.0  # differ only where the input is always 0
    return model


def strict_json(text: str) -> dict:
    def no_constants(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


RUN_KEYS = ("model", "model_format", "batch", "loss", "mode", "device", "seed", "torch", "seconds")


def assert_schema(report: dict) -> None:
    """The JSON contract of DESIGN.md, schema_version 1."""
    assert report["schema_version"] == 1
    assert report["tool"]["name"] == "nnhealth" and isinstance(report["tool"]["version"], str)
    assert_run_schema(report["run"])
    for layer in report["layers"]:
        assert isinstance(layer["name"], str) and isinstance(layer["kind"], str)
    assert report["curvature"] is None
    for f in report["findings"]:
        assert_finding_schema(f)
    for e in report["errors"]:
        assert set(e) == {"check", "message"}
    summary = report["summary"]
    counts = {
        s: sum(f["severity"] == s for f in report["findings"]) for s in ("error", "warning", "info")
    }
    assert {k: summary[k] for k in counts} == counts
    assert summary["healthy"] == (not report["findings"] and not report["errors"])


def assert_run_schema(run: dict) -> None:
    for key in RUN_KEYS:
        assert key in run, key
    if run["batch"] is not None:
        assert isinstance(run["batch"]["source"], str)
        assert all(isinstance(d, int) for d in run["batch"]["shape"])
    assert run["mode"] in ("train", "eval", None)
    assert isinstance(run["seconds"], NUMBER)


def assert_finding_schema(f: dict) -> None:
    assert set(f) >= {"code", "check", "severity", "layer", "message", "evidence", "fix"}
    assert f["severity"] in ("error", "warning", "info")
    assert f["code"].startswith("NH") and isinstance(f["message"], str) and f["fix"]
    assert all(v is None or isinstance(v, (int, float, str, bool)) for v in f["evidence"].values())


def hand_built() -> Report:
    """A report with every part filled in, for the formatters (tests/golden/report.txt)."""
    return Report(
        run=hand_built_run(),
        layers=hand_built_layers(),
        findings=hand_built_findings(),
        errors=(),
        skipped=(Skipped("NH202", "gradient-variance", "no gradients were captured"),),
        notes=("no targets: random class labels over 10 classes (seeded)",),
        tool_version="0.1.0",
    )


def hand_built_run() -> dict[str, Any]:
    return {
        "model": "sample_models/relu_dead_bias.pt",
        "model_format": "torch.save module (torch.nn classes, allowlisted)",
        "model_class": "Sequential",
        "batch": {
            "source": "batch.pt",
            "shape": [256, 256],
            "targets_shape": [256],
            "examples": 256,
        },
        "output_shape": [256, 10],
        "loss": "cross-entropy",
        "loss_value": 2.5123,
        "mode": "train",
        "device": "cpu",
        "seed": 0,
        "torch": "2.13.0",
        "seconds": 0.25,
        "params": 199946,
        "trainable_params": 199946,
        "checks": ["NH001", "NH101", "NH102", "NH201", "NH202"],
    }


def hand_built_layers() -> tuple[dict[str, Any], ...]:
    return (
        {
            "name": "fc1",
            "kind": "Linear",
            "role": "layer",
            "units": 256,
            "act_var": 2.01,
            "grad_var": 2e-8,
            "weight_norm": 22.6,
            "weight_grad_norm": 0.584,
            "trust_ratio": 38.7,
            "init_ratio": 1.02,
            "init_rule": "He 2/fan_in (relu)",
            "effective_width": 256,
        },
        {
            "name": "fc1:relu",
            "kind": "relu",
            "role": "activation",
            "functional": True,
            "units": 256,
            "act_var": 0.686,
            "grad_var": 4.07e-8,
            "dead_fraction": 0.0,
        },
        {
            "name": "fc2",
            "kind": "Linear",
            "role": "layer",
            "units": 256,
            "act_var": 10.9,
            "grad_var": 2.08e-8,
            "weight_norm": 22.6,
            "weight_grad_norm": 0.821,
            "trust_ratio": 27.5,
            "init_ratio": None,
            "init_rule": "not judged: followed by a normalization layer",
            "effective_width": 250,
        },
        {
            "name": "act2",
            "kind": "relu",
            "role": "activation",
            "units": 256,
            "act_var": 0.346,
            "grad_var": 1.1e-7,
            "dead_fraction": 0.598,
        },
        {
            "name": "head",
            "kind": "Linear",
            "role": "layer",
            "units": 10,
            "act_var": 0.404,
            "grad_var": 1.43e-6,
            "weight_norm": 4.49,
            "weight_grad_norm": 1.14,
        },
    )


def hand_built_findings() -> tuple[Finding, ...]:
    return (
        Finding(
            "NH101",
            "dead-relu",
            Severity.ERROR,
            "act2",
            "60% of units dead (153 of 256): zero for all 256 examples",
            {"dead_units": 153, "units": 256},
            "lower the learning rate",
            'layer = model.get_submodule("fc2")\nnn.init.constant_(layer.bias, 0.01)',
        ),
        Finding(
            "NH102",
            "saturation",
            Severity.WARNING,
            "x",
            "30% of tanh outputs saturated",
            {},
            "use Xavier init",
        ),
        Finding("NH101", "dead-relu", Severity.INFO, None, "small batch", {}, "use more examples"),
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU(inplace=True) module called twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def state_of(model: nn.Module):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def stack(
    width: int,
    depth: int,
    act: type[nn.Module],
    std: Callable[[int], float] | None,
    norm: type[nn.Module] | None = None,
    seed: int = 0,
) -> nn.Sequential:
    """depth hidden Linear(width) layers with act (and norm before it), then a 10-way head.
    std(fan_in) None keeps PyTorch's default init."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if std is not None:
            with torch.no_grad():
                lin.weight.normal_(0, std(width))
                lin.bias.zero_()
        layers += [lin] + ([norm(width)] if norm else []) + [act()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def he(n: int) -> float:
    return math.sqrt(2 / n)


def xavier(n: int) -> float:
    """Xavier/Glorot std of a square layer: sqrt(2 / (fan_in + fan_out)) = sqrt(1 / n)."""
    return math.sqrt(1 / n)


# ---- per-check cases: tests/checks/<code>_<name>.py, run by tests/test_check_cases.py ----


@dataclass(frozen=True)
class Case:
    """One named model for one check. A bad case sets ``expect``, the worst severity the
    check must report (on ``layer`` unless that is "any"); a good case leaves it None and
    must get nothing at warning or above. The batch is seeded unit-Gaussian ``inputs``
    with class targets in range(``classes``); ``kwargs`` are extra ``nnhealth.scan``
    arguments as (name, value) pairs; ``verify(findings, model)`` asserts what the
    snapshot cannot: numbers against theory, a fix snippet that runs."""

    id: str
    build: Callable[[], nn.Module]
    expect: Severity | None = None
    layer: str | None = "any"
    inputs: tuple[int, ...] = (128, 128)
    classes: int = 10
    kwargs: tuple[tuple[str, Any], ...] = ()
    verify: Callable[[list[Finding], nn.Module], None] | None = None


def case_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*case.inputs, generator=gen)
    y = torch.randint(0, case.classes, (case.inputs[0],), generator=gen)
    return x, y


def scan_case(code: str, case: Case) -> tuple[Report, nn.Module]:
    """``case`` scanned with only the check ``code`` selected (it must run, not skip);
    returns the report and the model, which the scan leaves as it was."""
    model = case.build()
    report = nnhealth.scan(model, case_batch(case), select=[code], **dict(case.kwargs))
    assert not report.errors and not report.skipped, (report.errors, report.skipped)
    assert all(f.code == code for f in report.findings)
    return report, model


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Conv-BatchNorm-ReLU x3 with a pooling step, PyTorch's default init: healthy.
    Input 3x8x8, 10 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class TinyTransformer(nn.Module):
    """One nn.TransformerEncoderLayer (d_model 32, 4 heads, no dropout), mean-pooled into
    a 10-way head, PyTorch's default init: healthy. Input (N, 8 tokens, 32)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


CNN_INPUTS = (32, 3, 8, 8)
TRANSFORMER_INPUTS = (32, 8, 32)


def healthy_cases() -> list[Case]:
    """The default-init models every check must pass: a small CNN with BatchNorm and a
    tiny Transformer encoder layer."""
    return [
        Case("small-cnn-batchnorm", small_cnn, inputs=CNN_INPUTS),
        Case("tiny-transformer", TinyTransformer, inputs=TRANSFORMER_INPUTS),
    ]


CASES_DIR = Path(__file__).parent / "checks"


def load_case_modules() -> list[ModuleType]:
    modules = []
    for path in sorted(CASES_DIR.glob("nh*.py")):
        name = f"nnhealth_cases.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses in a case module look themselves up here
        spec.loader.exec_module(module)
        modules.append(module)
    return modules


def zero_head(frozen: bool = False) -> nn.Module:
    """He ReLU MLP whose output layer is zero-initialized, as torchvision's ViT head."""
    model = stack(128, 3, nn.ReLU, he)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    model[-1].weight.requires_grad_(not frozen)
    return model


# -- curvature ground truth (test_curvature_trust, test_hvp_fallback) --------------------


class SoftplusOnce(torch.autograd.Function):
    """Right first derivative; backward marked once_differentiable (PyTorch's own way
    to say "no second derivative"), which autograd.grad silently ignores."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class Act(nn.Module):
    """softplus, or the custom Function ``fn`` computing it."""

    def __init__(self, fn=None) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return F.softplus(x) if self.fn is None else self.fn.apply(x)


def softplus_mlp(fn=None, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), Act(fn), nn.Linear(8, 8), Act(fn), nn.Linear(8, 3)).to(
        dtype
    )


def softplus_batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The cross-entropy loss's Hessian over every parameter, by reverse-over-reverse
    autodiff (torch.func.jacrev of grad), in the model's dtype."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            params[n] = flat[offset : offset + k].view(s)
            offset += k
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return jacrev(grad(loss))(flat0).detach().numpy()


def sensitivities(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, modules: list[tuple[str, nn.Module]]
) -> dict[str, float]:
    """E_n ||y_n||^2 * E_n ||g_n||^2 of each of ``modules``' outputs under cross-entropy,
    from the tensors themselves (NH202's sensitivity by brute force)."""
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            outs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules]
    try:
        nn.functional.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    b = x.shape[0]
    return {
        n: float((o.detach().double() ** 2).sum() / b * (o.grad.double() ** 2).sum() / b)
        for n, o in outs.items()
    }


def relu_cnn_avgpool() -> nn.Sequential:
    """Conv-ReLU-Conv-ReLU-AvgPool-Linear at PyTorch's default init (seed 0): a healthy
    net that NH202 once called vanishing."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class HFLogits(nn.Module):
    """A Hugging Face model called on token ids, returning its logits (the last
    position's when ``last``)."""

    def __init__(self, model: nn.Module, last: bool) -> None:
        super().__init__()
        self.m, self.last = model, last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.m(input_ids=ids).logits
        return logits[:, -1] if self.last else logits


def small_bert() -> nn.Module:
    """BertForSequenceClassification, 2 layers of width 64, 3 labels, at its own init
    (seed 0); skipped where transformers does not import."""
    tf = pytest.importorskip("transformers")
    config = tf.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=100,
        num_labels=3,
    )
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(config)


def train_history(path: Path, lr: float, steps: int) -> Path:
    """A history written by nnhealth.Monitor on a ReLU/Tanh MLP trained with SGD at
    ``lr`` for ``steps`` steps, every 5th captured and measured (lambda_max); at lr 3 the
    lambda_max goes over its limit, ReLU units die and the tanh saturates."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to threads on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", nnhealth.NnhealthWarning)
            monitor = nnhealth.Monitor(model, opt, every=5, hessian_every=5, log=path)
            for _ in range(steps):
                idx = torch.randint(0, 256, (64,))
                with monitor.step((x[idx], y[idx])):
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    monitor.observe(loss)
                    opt.zero_grad()
                    loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return path
