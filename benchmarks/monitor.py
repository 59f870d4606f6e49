"""Cost of nnhealth.Monitor in a training loop, against the same loop without it.

Models: the benchmark CNN (a small ResNet, batch 64 x 3 x 32 x 32, cross-entropy) and
the benchmark transformer (4-layer ``nn.TransformerEncoder``, batch 16 x 64 x 256, MSE),
both as ``benchmarks/capture_overhead.py`` defines them. A step is the whole loop body:
forward, loss, ``zero_grad``, backward, ``optimizer.step()`` (SGD, lr 1e-3, momentum
0.9).

* loop: ``--steps`` steps (300) plain, and with ``Monitor(model, optimizer,
  every=100)`` (``with monitor.step(batch):`` around the forward and backward,
  ``monitor.observe(loss)``): total wall time; the two loops run interleaved (their
  order alternating) ``--repeats`` times, each from the same initial weights and a new
  optimizer; ratio = median(monitor) / median(plain). Target <= 1.05x.
* step: one capture step (a monitor with every=1: the recorder attached, the user's
  pass, the analysis and the history line) against one plain step, interleaved
  ``--step-repeats`` times after a warm-up; ratio of the medians. Target <= 1.3x.

Findings are not shown (the monitor's warnings are silenced). Targets are informational:
the exit code is 0 unless something crashes.

    python benchmarks/monitor.py [--quick] [--steps N] [--repeats N] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import nnhealth

LOOP_TARGET = 1.05
STEP_TARGET = 1.3
EVERY = 100
MODELS = ("resnet", "transformer")
WARMUP = 3


def _benchmark_models():
    """benchmarks/capture_overhead.py, whose build_case makes the models."""
    path = Path(__file__).with_name("capture_overhead.py")
    spec = importlib.util.spec_from_file_location("capture_overhead", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def _step(model, optimizer, inputs, make_loss, monitor=None) -> None:
    if monitor is None:
        loss = make_loss(model(inputs))
        optimizer.zero_grad()
        loss.backward()
    else:
        with monitor.step(inputs):
            loss = make_loss(model(inputs))
            monitor.observe(loss)
            optimizer.zero_grad()
            loss.backward()
    optimizer.step()


class Loop:
    """One model's training loop, plain or monitored, from the same initial weights."""

    def __init__(self, case) -> None:
        self.case = case
        self.initial = copy.deepcopy(case.model.state_dict())

    def fresh(self) -> torch.optim.Optimizer:
        self.case.model.load_state_dict(self.initial)
        return _optimizer(self.case.model)

    def monitor(self, optimizer: torch.optim.Optimizer, every: int) -> nnhealth.Monitor:
        return nnhealth.Monitor(self.case.model, optimizer, every=every)

    def run(self, steps: int, monitored: bool) -> tuple[float, int]:
        """Seconds for ``steps`` steps, and the monitor's history lines."""
        model, case = self.case.model, self.case
        optimizer = self.fresh()
        monitor = self.monitor(optimizer, EVERY) if monitored else None
        start = time.perf_counter()
        for _ in range(steps):
            _step(model, optimizer, case.inputs, case.make_loss, monitor)
        seconds = time.perf_counter() - start
        return seconds, 0 if monitor is None else len(monitor.lines)

    def steps(self, repeats: int) -> dict[str, float]:
        """Median ms of one plain step and of one capture step, interleaved."""
        model, case = self.case.model, self.case
        optimizer = self.fresh()
        monitor = self.monitor(optimizer, 1)
        runs: dict[str, Callable[[], None]] = {
            "plain": lambda: _step(model, optimizer, case.inputs, case.make_loss),
            "capture": lambda: _step(model, optimizer, case.inputs, case.make_loss, monitor),
        }
        for run in runs.values():
            for _ in range(WARMUP):
                run()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - start) * 1e3)
        return {name: statistics.median(values) for name, values in samples.items()}


def measure(name: str, models, steps: int, repeats: int, step_repeats: int) -> dict:
    case = models.build_case(name)
    loop = Loop(case)
    loop.run(min(steps, 10), monitored=False)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    lines = 0
    for repeat in range(repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)
        for monitored in order:
            seconds, count = loop.run(steps, monitored)
            times[monitored].append(seconds)
            lines = max(lines, count)
    ms = loop.steps(step_repeats)
    plain, monitored = statistics.median(times[False]), statistics.median(times[True])
    return {
        "model": name,
        "params": sum(p.numel() for p in case.model.parameters()),
        "batch": "x".join(str(d) for d in case.inputs.shape),
        "steps": steps,
        "lines": lines,
        "plain_s": plain,
        "monitor_s": monitored,
        "loop_ratio": monitored / plain,
        "plain_step_ms": ms["plain"],
        "capture_step_ms": ms["capture"],
        "step_ratio": ms["capture"] / ms["plain"],
    }


def mark(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "OVER"


def render(meta: dict, rows: list[dict]) -> None:
    print(
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['steps']} steps, "
        f"Monitor(every={EVERY}); loop: median of {meta['repeats']} interleaved runs; "
        f"step: median of {meta['step_repeats']} after {WARMUP} warm-up"
    )
    head = ("model", "params", "batch", "plain s", "monitor s", "loop x", "step ms")
    head += ("capture ms", "step x")
    print("{:<13}{:>10}{:>13}{:>9}{:>11}{:>13}{:>9}{:>12}{:>13}".format(*head))
    for r in rows:
        print(
            f"{r['model']:<13}{r['params']:>10,}{r['batch']:>13}{r['plain_s']:>9.2f}"
            f"{r['monitor_s']:>11.2f}{r['loop_ratio']:>8.3f} {mark(r['loop_ratio'], LOOP_TARGET)}"
            f"{r['plain_step_ms']:>9.1f}{r['capture_step_ms']:>12.1f}"
            f"{r['step_ratio']:>8.2f} {mark(r['step_ratio'], STEP_TARGET)}"
        )
    met = [
        f"loop <= {LOOP_TARGET}x: "
        + ("met" if all(r["loop_ratio"] <= LOOP_TARGET for r in rows) else "missed"),
        f"capture step <= {STEP_TARGET}x: "
        + ("met" if all(r["step_ratio"] <= STEP_TARGET for r in rows) else "missed"),
    ]
    print("targets: " + "; ".join(met) + " (informational)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each loop")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop")
    parser.add_argument("--step-repeats", type=int, default=15, help="timed single steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--only", choices=MODELS, default=None, help="one model")
    parser.add_argument(
        "--quick", action="store_true", help="100-step loops, 1 run each, 5 single steps"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.step_repeats = EVERY, 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)
    models = _benchmark_models()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnhealth.NnhealthWarning)
        for name in [args.only] if args.only else MODELS:
            rows.append(measure(name, models, args.steps, args.repeats, args.step_repeats))
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "every": EVERY,
        "repeats": args.repeats,
        "step_repeats": args.step_repeats,
        "warmup": WARMUP,
        "targets": {"loop": LOOP_TARGET, "step": STEP_TARGET},
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": rows}, indent=2))
        return
    render(meta, rows)


if __name__ == "__main__":
    main()
