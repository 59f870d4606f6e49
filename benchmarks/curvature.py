"""Top Hessian eigenvalue: nnhealth's Lanczos against PyHessian's power iteration and
scipy's eigsh, at the default --hessian-tol (1e-2) and at 1e-3, on the same models,
batches and operator, in one process.

For each model and tolerance the table gives, per method, the Hessian-vector products
(median over ``--seeds`` start vectors, with the range when they differ), the median
wall time (building the gradient graph included, as a scan or PyHessian pays it) and
the true relative error of lambda_max (median, and the worst in parentheses):

* ours: ``nnhealth.curvature`` Lanczos as a scan runs it (the loss gradient plus a
  random part as the start, the symmetry test's products counted, the basis capped by
  free memory), stopping when the certified bound is at most ``tol`` of the estimate;
  the bound column is the largest certified relative bound over the seeds; ">bound"
  marks a run whose true error exceeded its bound (the bound certifies the eigenvalue
  nearest the estimate: with a top pair closer than ``tol`` that can be the second);
* PyHessian: the power iteration of ``hessian.eigenvalues(maxIter=100, tol)``
  (github.com/amirgholami/PyHessian, pyhessian/hessian.py), reimplemented on our
  operator: a random float32 start; each step renormalizes v (dividing by ||v|| +
  1e-6), takes Hv and the Rayleigh quotient v.Hv in float32, sets v = Hv / (||Hv|| +
  1e-6), and stops when |previous - new| / (|previous| + 1e-6) < tol, returning the
  previous estimate (the last one when it runs out of its 100 steps: marked "limit").
  Its default is tol=1e-3, the 1e-3 rows; the 1e-2 rows run it at tol=1e-2;
* scipy ``eigsh(k=1, which="LA", tol)`` (ARPACK, the same residual test as ours) on
  our operator from a random start.

The products are the same for every method: a double backward through a gradient graph
built once (PyHessian does the same), in eval mode (PyHessian forces it: dropout off,
BatchNorm on running statistics), attention on the math SDPA backend (the fused CPU
kernel has no second derivative). Every method runs on the float32 model.

The truth is a float64 copy of the model: its dense Hessian's top eigenvalue when it
has at most ``DENSE_MAX`` parameters, else a long float64 Lanczos run certified to
1e-10. The "float32 floor" printed per model is how far the float32 operator's own
lambda_max (a long run on it) lies from the truth: no float32 method gets closer.

    python benchmarks/curvature.py [--seeds N] [--models mlp-small,mlp,cnn,transformer]
                                   [--lanczos auto|full|three-term] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nnhealth.curvature.hvp import HessianOperator
from nnhealth.curvature.lanczos import lanczos
from nnhealth.curvature.measure import scan_lanczos
from nnhealth.runner import ScanOptions

DEFAULT_TOL = ScanOptions().hessian_tol  # 1e-2
TOLS = (DEFAULT_TOL, 1e-3)
BUDGET = ScanOptions().hessian_budget  # a scan's default product budget
PYHESSIAN_MAX_ITER = 100  # PyHessian's default maxIter
PYHESSIAN_EPS = 1e-6  # added to norms and to the denominator of its stopping test
DENSE_MAX = 4000  # parameters up to which the truth is the dense Hessian
METHODS = ("ours", "PyHessian", "eigsh")


def mlp_small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 10)
    )
    return model, torch.randn(64, 20), torch.randint(0, 10, (64,))


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(500, 500), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(500, 10))
    return model, torch.randn(1000, 500), torch.randint(0, 10, (1000,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
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
    return model, torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return Transformer(), torch.randn(16, 32, 64), torch.randint(0, 10, (16,))


MODELS = {"mlp-small": mlp_small, "mlp": mlp, "cnn": cnn, "transformer": transformer}


@dataclass(frozen=True)
class Run:
    value: float
    hvps: int
    seconds: float
    bound: float = float("nan")  # certified relative bound (ours only)
    limit: bool = False  # stopped by its iteration limit, not its test


def operator(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> HessianOperator:
    return HessianOperator(model, x, lambda o: F.cross_entropy(o, y), mode="eval")


def timed(fn: Callable[[], tuple[float, int, float, bool]]) -> Run:
    start = time.perf_counter()
    value, hvps, bound, limit = fn()
    return Run(value, hvps, time.perf_counter() - start, bound, limit)


VARIANT: list[str | None] = [None]  # --lanczos: None (by memory), "full", "three-term"


def ours(model, x, y, tol: float, seed: int) -> tuple[float, int, float, bool]:
    with operator(model, x, y) as op:
        res = scan_lanczos(op, tol=tol, budget=BUDGET, seed=seed, variant=VARIANT[0])
        return res.top[0].value, op.products, res.top[0].relative_bound, not res.converged


def _pyhessian_normalized(v: torch.Tensor) -> torch.Tensor:
    return v / (float(torch.dot(v, v)) ** 0.5 + PYHESSIAN_EPS)


def pyhessian(model, x, y, tol: float, seed: int) -> tuple[float, int, float, bool]:
    """PyHessian's ``eigenvalues(maxIter=100, tol=tol, top_n=1)``: see the module doc."""
    with operator(model, x, y) as op:
        gen = torch.Generator().manual_seed(seed)
        v = _pyhessian_normalized(torch.randn(op.n, generator=gen, dtype=torch.float32))
        estimate = None
        for _ in range(PYHESSIAN_MAX_ITER):
            v = _pyhessian_normalized(v)  # its orthonormalization against no eigenvectors
            hv = op.matvec(v.double()).float()  # float32 products, as in the model
            new = float(torch.dot(hv, v))
            v = _pyhessian_normalized(hv)
            if estimate is not None and abs(estimate - new) / (abs(estimate) + PYHESSIAN_EPS) < tol:
                return estimate, op.products, float("nan"), False
            estimate = new
        return estimate, op.products, float("nan"), True


def eigsh(model, x, y, tol: float, seed: int) -> tuple[float, int, float, bool]:
    with operator(model, x, y) as op:
        linear = sla.LinearOperator(
            (op.n, op.n),
            dtype=np.float64,
            matvec=lambda v: op.matvec(torch.from_numpy(np.asarray(v).ravel())).numpy(),
        )
        v0 = np.random.default_rng(seed).standard_normal(op.n)
        value = sla.eigsh(linear, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        return float(value[0]), op.products, float("nan"), False


def pyhessian_package(model, x, y, tol: float, seed: int) -> tuple[float, int, float, bool]:
    """The PyHessian package itself (``pip install '.[bench]'``): ``hessian(model,
    criterion, data=(x, y), cuda=False).eigenvalues(maxIter=100, tol=tol)``, its
    products counted where it takes them (``hessian_vector_product``), its random start
    seeded through torch's global generator, attention on the math backend."""
    # the module (the package's __init__ rebinds the name pyhessian.hessian to its class)
    ph = importlib.import_module("pyhessian.hessian")

    calls = 0
    product = ph.hessian_vector_product

    def counted(*args, **kwargs):
        nonlocal calls
        calls += 1
        return product(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            h = ph.hessian(model, lambda o, t: F.cross_entropy(o, t), data=(x, y), cuda=False)
            values, _ = h.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = product
    return float(values[0]), calls, float("nan"), calls >= PYHESSIAN_MAX_ITER


def _pyhessian_runner() -> Callable:
    """The package when it is installed, else the reproduction of its loop above."""
    try:
        import pyhessian.hessian
    except ImportError:
        return pyhessian
    return pyhessian_package


RUNNERS = {"ours": ours, "PyHessian": pyhessian, "eigsh": eigsh}


def long_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """lambda_max of ``model``'s own operator (its dtype), certified to 1e-10."""
    with operator(model, x, y) as op:
        res = lanczos(op.matvec, op.n, tol=1e-10, max_iter=1000, seed=123)
    if not res.converged:
        bound = res.top[0].relative_bound
        print(f"warning: the reference run stopped at bound {bound:.1e}", file=sys.stderr)
    return res.top[0].value


def dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The top eigenvalue of the dense Hessian, its columns taken one product each."""
    with operator(model, x, y) as op:
        eye = torch.eye(op.n, dtype=torch.float64)
        h = torch.stack([op.matvec(e) for e in eye]).numpy()
    return float(np.linalg.eigvalsh((h + h.T) / 2)[-1])


def truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, str]:
    """(the float64 truth, the float32 floor, how the truth was had)."""
    wide = copy.deepcopy(model).double().eval()
    n = sum(p.numel() for p in model.parameters())
    how = "dense Hessian" if n <= DENSE_MAX else "float64 Lanczos to 1e-10"
    true = dense(wide, x.double(), y) if n <= DENSE_MAX else long_run(wide, x.double(), y)
    return true, abs(long_run(model, x, y) - true) / abs(true), how


def cells(runs: list[Run], true: float, certified: bool) -> list[str]:
    """HVPs (median [range]), seconds (median), true error (median (worst)) and, for a
    certified method, the largest relative bound; ">bound" when a run's true error
    exceeded its own bound (a close top pair: Lanczos certifies the eigenvalue nearest its
    estimate, which need not be lambda_max)."""
    hvps = sorted(r.hvps for r in runs)
    errors = [abs(r.value - true) / abs(true) for r in runs]
    count = f"{statistics.median(hvps):g}"
    if hvps[0] != hvps[-1]:
        count += f" [{hvps[0]}-{hvps[-1]}]"
    if any(r.limit for r in runs):
        count += " limit"
    out = [
        count,
        f"{statistics.median(r.seconds for r in runs):.2f}",
        f"{statistics.median(errors):.1e} ({max(errors):.1e})",
    ]
    if certified:
        out.append(f"{max(r.bound for r in runs):.1e}")
        if any(e > r.bound for e, r in zip(errors, runs, strict=True)):
            out[2] += " >bound"  # it found another eigenvalue within its bound, not lambda_max
    return out


HEADER = [
    "model",
    "tol",
    "ours HVPs",
    "ours s",
    "ours true err",
    "ours bound",
    "PyHessian HVPs",
    "PyHessian s",
    "PyHessian true err",
    "eigsh HVPs",
    "eigsh s",
    "eigsh true err",
]


def model_rows(name: str, seeds: int) -> tuple[list[list[str]], str]:
    """The table's rows for one model (one per tolerance) and a line describing it."""
    torch.manual_seed(0)
    model, x, y = MODELS[name]()
    model.eval()
    with sdpa_kernel(SDPBackend.MATH):
        true, floor, how = truth(model, x, y)
        rows = []
        for tol in TOLS:
            row = [name, f"{tol:g}"]
            for method in METHODS:
                runner = _pyhessian_runner() if method == "PyHessian" else RUNNERS[method]
                runs = [timed(functools.partial(runner, model, x, y, tol, s)) for s in range(seeds)]
                row += cells(runs, true, method == "ours")
            rows.append(row)
    params = sum(p.numel() for p in model.parameters())
    line = (
        f"{name}: {params:,} params, batch {list(x.shape)}, lambda_max {true:.6g} "
        f"({how}), float32 floor {floor:.1e}"
    )
    return rows, line


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [HEADER, *rows]]
    return "\n".join(lines)


def markdown(rows: list[list[str]], setting: str, notes: list[str], command: str) -> str:
    table = [
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADER))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    return "\n".join(
        [
            *table,
            "",
            (
                f"{setting}. HVPs: median over the start vectors [range]; s: median seconds; "
                "true err: relative error of lambda_max, median (worst); bound: ours' largest "
                "certified relative bound (>bound: a run's true error exceeded it). "
                "PyHessian's default is tol 1e-3 (the 1e-3 rows)."
            ),
            "",
            *(f"- {n}" for n in notes),
            "",
            f"Rerun: `{command}`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="start vectors per method")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument(
        "--lanczos",
        choices=("auto", "full", "three-term"),
        default="auto",
        help="ours: a stored basis, three vectors, or as a scan chooses by memory",
    )
    args = parser.parse_args()
    VARIANT[0] = None if args.lanczos == "auto" else args.lanczos
    setting = (
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, eval mode, "
        f"float32 models, {args.seeds} start vectors, ours: Lanczos {args.lanczos}, load "
        f"average {os.getloadavg()[0]:.1f} "
        "at the start, PyHessian: "
        + (
            "the pyhessian package"
            if _pyhessian_runner() is pyhessian_package
            else "its loop reproduced (pip install '.[bench]' for the package)"
        )
    )
    print(setting, flush=True)
    rows, notes = [], []
    for name in args.models.split(","):
        model_table, line = model_rows(name, args.seeds)
        rows += model_table
        notes.append(line)
        print(line, file=sys.stderr, flush=True)  # progress
    print(text_table(rows))
    print("\n".join(notes))
    if args.markdown is not None:
        command = (
            f"python benchmarks/curvature.py --seeds {args.seeds} --models {args.models} "
            f"--lanczos {args.lanczos}"
        )
        args.markdown.write_text(markdown(rows, setting, notes, command))


if __name__ == "__main__":
    main()
