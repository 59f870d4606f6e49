"""Time of the symmetry check's grouping (NH501) on wide layers.

For layers of 1k, 4k and 16k units (fan-in 1024, float32) this times the grouping of
identical units (rows with their bias) in three states: random init (no groups), a few
copied units, and zero init (one group of everything). It also times a brute-force
all-pairs comparison on the 1k layer, the obvious alternative, to show the ratio.
Median of ``--repeats`` runs, one process.

    python benchmarks/symmetry.py [--repeats N] [--fan-in N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from nnhealth.capture.weights import from_model

WIDTHS = (1024, 4096, 16384)


def layer(width: int, fan_in: int, state: str) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, width)
    with torch.no_grad():
        if state == "copied":
            lin.weight[1:9] = lin.weight[0]
            lin.bias[1:9] = lin.bias[0]
        elif state == "zero":
            lin.weight.zero_()
            lin.bias.zero_()
    # a second layer so that this one is hidden (the output layer is not judged)
    return nn.Sequential(lin, nn.ReLU(), nn.Linear(width, 2))


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def brute_force(rows: np.ndarray, rtol: float) -> int:
    """All pairs, vectorized by row: the O(n^2 d) reference."""
    norms = np.linalg.norm(rows, axis=1)
    pairs = 0
    for i in range(len(rows)):
        d = np.linalg.norm(rows[i + 1 :] - rows[i], axis=1)
        pairs += int((d <= rtol * np.maximum(norms[i + 1 :], norms[i])).sum())
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fan-in", type=int, default=1024)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fan-in {args.fan_in}, "
        f"median of {args.repeats}"
    )
    print(f"{'units':>7} {'state':>8} {'seconds':>9} {'groups':>7} {'eff. width':>11}")
    for width in WIDTHS:
        for state in ("random", "copied", "zero"):
            model = layer(width, args.fan_in, state)
            result = from_model(model, (), 1e-6)
            secs = median_seconds(lambda m=model: from_model(m, (), 1e-6), args.repeats)
            w = result[0]
            print(
                f"{width:>7} {state:>8} {secs:>9.3f} {len(w.groups):>7} "
                f"{w.effective_width:>5}/{w.units}"
            )
    model = layer(WIDTHS[0], args.fan_in, "random")
    lin = model[0]
    rows = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().numpy()
    ours = median_seconds(lambda: from_model(model, (), 1e-6), args.repeats)
    brute = median_seconds(lambda: brute_force(rows, 1e-6), max(1, args.repeats // 2))
    print(
        f"\nall-pairs reference at {WIDTHS[0]} units: {brute:.3f} s, "
        f"ours {ours:.3f} s ({brute / ours:.0f}x faster); all pairs grow as n^2, ours as n log n"
    )


if __name__ == "__main__":
    main()
