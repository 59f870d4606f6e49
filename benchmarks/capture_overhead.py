"""Cost of nnhealth's instrumented capture pass relative to a plain forward+backward.

For each of three models (a 5 x 500 tanh MLP, a small ResNet-style CNN and a 4-layer
``nn.TransformerEncoder``) the script compares, on the same model, batch and loss:

* plain:   ``loss = make_loss(model(x))`` then ``torch.autograd.grad(loss, params)``;
* capture: ``nnhealth.capture.instrument.run_pass(model, x, make_loss, plan,
  examples=...)`` with the plan of a default scan (every default check selected:
  saturation counts and fingerprints on, no Hessian).

Time: both paths are warmed up (3 runs each), then run interleaved (plain, capture,
plain, ...) ``--repeats`` times; the ratio is median(capture) / median(plain).

Peak memory: each (model, path) is measured in a fresh subprocess started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that large tensors are mmapped and freed memory goes
back to the OS. The child does one warm-up pass of the path, reads VmRSS, resets the
high-water mark through /proc/self/clear_refs, runs one pass and reads VmHWM; the peak
increase is VmHWM - VmRSS. Without a writable clear_refs it skips the warm-up and uses
the ru_maxrss increase over the pass instead (noisier). Linux only.

Targets (<= 1.3x time and memory) are informational: the exit code is 0 unless
something crashes.

    python benchmarks/capture_overhead.py [--repeats N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnhealth.analyzers import select_checks
from nnhealth.capture.instrument import run_pass
from nnhealth.options import ScanOptions
from nnhealth.plan import Plan, is_opt_in, make_plan

TARGET = 1.3
WARMUP = 3
QUICK_REPEATS = 5
PATHS = ("plain", "capture")
MODELS = ("mlp", "resnet", "transformer")


@dataclass
class Case:
    model: nn.Module
    inputs: torch.Tensor
    make_loss: Callable[[torch.Tensor], torch.Tensor]


class BasicBlock(nn.Module):
    """torchvision-style basic block: one in-place ReLU module used twice."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(cin, width, 1 if i == 0 else 2))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def cross_entropy(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: F.cross_entropy(out, targets)


def mse(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: F.mse_loss(out, target)


def build_case(name: str) -> Case:
    torch.manual_seed(0)
    if name == "mlp":
        layers: list[nn.Module] = []
        for _ in range(5):
            layers += [nn.Linear(500, 500), nn.Tanh()]
        model: nn.Module = nn.Sequential(*layers, nn.Linear(500, 10))
        x = torch.randn(1000, 500)
        loss = cross_entropy(torch.randint(0, 10, (1000,)))
    elif name == "resnet":
        model = SmallResNet()
        x = torch.randn(64, 3, 32, 32)
        loss = cross_entropy(torch.randint(0, 10, (64,)))
    elif name == "transformer":
        layer = nn.TransformerEncoderLayer(
            d_model=256, nhead=4, dim_feedforward=1024, dropout=0.1, batch_first=True
        )
        model = nn.TransformerEncoder(layer, num_layers=4)
        x = torch.randn(16, 64, 256)
        loss = mse(torch.randn(16, 64, 256))
    else:
        raise ValueError(f"unknown model {name!r}")
    return Case(model.train(), x, loss)


def plain_pass(case: Case) -> None:
    params = [p for p in case.model.parameters() if p.requires_grad]
    loss = case.make_loss(case.model(case.inputs))
    torch.autograd.grad(loss, params)


def default_plan() -> Plan:
    """The plan of ``nnhealth scan`` with its defaults (the Hessian is opt-in)."""
    checks = [c for c in select_checks(None, None) if not is_opt_in(c)]
    return make_plan([(c, c.defaults()) for c in checks], ScanOptions())


PLAN = default_plan()


def capture_pass(case: Case) -> None:
    run_pass(case.model, case.inputs, case.make_loss, PLAN, examples=case.inputs.shape[0])


RUNNERS: dict[str, Callable[[Case], None]] = {"plain": plain_pass, "capture": capture_pass}


def time_case(case: Case, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each path, interleaved after a warm-up."""
    for run in RUNNERS.values():
        for _ in range(WARMUP):
            run(case)
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(repeats):
        for path in PATHS:
            start = time.perf_counter()
            RUNNERS[path](case)
            samples[path].append((time.perf_counter() - start) * 1e3)
    return {path: statistics.median(samples[path]) for path in PATHS}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS; False if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_memory_child(name: str, path: str) -> None:
    """Print {"peak_mb", "method"} for one pass of ``path`` (runs in a fresh process)."""
    case, run = build_case(name), RUNNERS[path]
    if _reset_hwm():
        run(case)
        before = _status_kb("VmRSS")
        _reset_hwm()
        run(case)
        peak, method = _status_kb("VmHWM"), "VmHWM after clear_refs, warm"
    else:
        before = _status_kb("VmRSS")
        run(case)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        method = "ru_maxrss, cold (no clear_refs)"
    print(json.dumps({"peak_mb": max(peak - before, 0) / 1024, "method": method}))


def measure_memory(name: str, path: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure-memory", name, path]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mark(ratio: float) -> str:
    return "PASS" if ratio <= TARGET else "OVER"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per path")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument(
        "--_measure-memory",
        nargs=2,
        metavar=("MODEL", "PATH"),
        dest="measure",
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.measure:
        measure_memory_child(*args.measure)
        return
    repeats = QUICK_REPEATS if args.quick else args.repeats
    rows, methods = [], set()
    for name in MODELS:
        case = build_case(name)
        ms = time_case(case, repeats)
        mem = {path: measure_memory(name, path) for path in PATHS}
        methods |= {m["method"] for m in mem.values()}
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in case.model.parameters()),
                "batch": "x".join(str(d) for d in case.inputs.shape),
                "plain_ms": ms["plain"],
                "capture_ms": ms["capture"],
                "time_ratio": ms["capture"] / ms["plain"],
                "plain_peak_mb": mem["plain"]["peak_mb"],
                "capture_peak_mb": mem["capture"]["peak_mb"],
                "mem_ratio": mem["capture"]["peak_mb"] / mem["plain"]["peak_mb"],
            }
        )
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": WARMUP,
        "memory_method": sorted(methods),
        "target": TARGET,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    print(
        f"torch {meta['torch']}, {meta['threads']} threads, {repeats} repeats "
        f"(median, interleaved, {WARMUP} warm-up); memory: {', '.join(meta['memory_method'])}"
    )
    head = (
        "model",
        "params",
        "batch",
        "plain ms",
        "capture ms",
        "time x",
        "plain MB",
        "capture MB",
        "mem x",
    )
    print("{:<12}{:>10}{:>14}{:>10}{:>12}{:>13}{:>10}{:>12}{:>13}".format(*head))
    for r in rows:
        print(
            f"{r['model']:<12}{r['params']:>10,}{r['batch']:>14}{r['plain_ms']:>10.1f}"
            f"{r['capture_ms']:>12.1f}{r['time_ratio']:>8.2f} {mark(r['time_ratio'])}"
            f"{r['plain_peak_mb']:>10.1f}{r['capture_peak_mb']:>12.1f}"
            f"{r['mem_ratio']:>8.2f} {mark(r['mem_ratio'])}"
        )
    print(f"targets: time <= {TARGET}x, peak memory <= {TARGET}x (informational)")


if __name__ == "__main__":
    main()
