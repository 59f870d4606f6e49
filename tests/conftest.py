from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
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
