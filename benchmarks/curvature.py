"""Top Hessian eigenvalue: nnhealth's Lanczos against PyHessian, power iteration and
scipy's eigsh, on the same models, batches and operator, in one process.

For each model (the 5 x 500 tanh MLP at batch 1000, a small CNN at batch 128, a
TransformerEncoder) and each method, the table gives the lambda_max estimate, its true
relative error against a long float64 Lanczos run, the Hessian-vector products used and
the median wall time of ``--repeats`` runs:

* ours: ``nnhealth.curvature`` Lanczos with a scan's settings (the default budget of
  products, the basis capped by free memory, started from the loss gradient plus a
  random part), stopping when the certified bound (the Ritz residual) is at most 1e-3 of
  the estimate; "ours, random start" is the same from a purely random vector;
* power iteration on our operator, from a random vector, run until its true error is
  <= 1e-3 (it is told the truth: no stopping rule could do better); the same from our
  start vector; run until its true error is as small as ours turned out to be (the
  accuracy we deliver, but never below twice the float32 floor, see below); and
  stopped on the same certified bound as ours (residual <= 1e-3). Power iteration
  stops at 2000 products; a row that got there (or ours, out of its budget) is marked
  "(limit)";
* PyHessian: ``hessian(model, criterion, data).eigenvalues()`` with its defaults (power
  iteration stopping when successive estimates change by < 1e-3, at most 100 products),
  and with tol=1e-5 and maxIter=1000;
* scipy ``eigsh(k=1, which="LA", tol=1e-3)`` (ARPACK, the same residual test) on our
  operator.

Below each table: "ours first within 1e-3" is the first Lanczos step whose estimate had
a true error <= 1e-3 (what a stop that knew the truth would cost); the rest of our
products buy the certificate. Then the ratios of the issue's targets.

The models and every method run in float32; the truth is a float64 copy of the model.
The float32 operator's own top eigenvalue (a long Lanczos run on it) differs from the
truth by the "float32 floor" printed above each table: no float32 method can get closer.

PyHessian switches the model to eval mode, so every method runs in eval mode (dropout
off, BatchNorm on running statistics): the same operator for all. Attention runs on the
math SDPA backend (the fused CPU kernel has no second derivative). PyHessian is a
benchmark-only extra: ``pip install -c constraints.txt '.[bench]'``.

    python benchmarks/curvature.py [--repeats N] [--models mlp,cnn,transformer]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable

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

TOL = 1e-3
BUDGET = ScanOptions().hessian_budget  # a scan's default product budget
POWER_LIMIT = 2000


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


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


def timed(
    fn: Callable[[], tuple[float, int, bool]], repeats: int
) -> tuple[float, int, float, bool]:
    """(estimate, products, median seconds, stopped as meant) of ``fn`` over ``repeats``
    runs; the last is False for a run that hit its product limit."""
    times, result = [], (0.0, 0, True)
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result[0], result[1], statistics.median(times), result[2]


def long_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """lambda_max of ``model``'s own operator (its dtype), to 1e-10 certified."""
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y), mode="eval") as op:
        res = lanczos(op.matvec, op.n, tol=1e-10, max_iter=1000, seed=123)
    if not res.converged:
        print(
            f"warning: the reference run stopped at bound {res.top[0].relative_bound:.1e}",
            file=sys.stderr,
        )
    return res.top[0].value


def truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(the float64 truth, the float32 floor: how far the float32 operator's own
    lambda_max lies from it, relative)."""
    true = long_run(copy.deepcopy(model).double().eval(), x.double(), y)
    own = long_run(model, x, y)
    return true, abs(own - true) / abs(true)


def ours(
    model, x, y, random_start: bool = False, true: float | None = None, first: list | None = None
) -> tuple[float, int, bool]:
    """(estimate, products, converged) of Lanczos as a scan runs it; the first step
    within TOL of ``true`` is appended to ``first``."""

    def watch(it: int, value: float, _bound: float) -> None:
        if first is not None and not first and abs(value - true) <= TOL * abs(true):
            first.append(it)

    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y), mode="eval") as op:
        res = scan_lanczos(op, tol=TOL, budget=BUDGET, seeded=not random_start, progress=watch)
        return res.top[0].value, op.products, res.converged


def power(
    model, x, y, true: float | None, start: str = "random", tol: float = TOL
) -> tuple[float, int, bool]:
    """Power iteration from a random vector (or ``start="gradient"``: ours, same seed),
    until the true error is <= ``tol`` (``true`` given) or, without the truth, until
    the certified residual ||Hv - rho v|| is <= TOL * |rho|, as our Lanczos stops."""
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y), mode="eval") as op:
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(op.n, dtype=torch.float64, generator=gen)
        v /= v.norm()
        if start == "gradient":
            g = op.gradient()
            v = v + g / g.norm()
            v /= v.norm()
        est = 0.0
        for _ in range(POWER_LIMIT):
            hv = op.matvec(v)
            est = float(v @ hv)
            if true is not None and abs(est - true) <= tol * abs(true):
                return est, op.products, True
            if true is None and float((hv - est * v).norm()) <= TOL * abs(est):
                return est, op.products, True
            v = hv / hv.norm()
        return est, op.products, False


def scipy_eigsh(model, x, y) -> tuple[float, int, bool]:
    with HessianOperator(model, x, lambda o: F.cross_entropy(o, y), mode="eval") as op:
        operator = sla.LinearOperator(
            (op.n, op.n),
            dtype=np.float64,
            matvec=lambda v: op.matvec(torch.from_numpy(np.asarray(v).ravel())).numpy(),
        )
        v0 = np.random.default_rng(0).standard_normal(op.n)
        value = sla.eigsh(operator, k=1, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
        return float(value[0]), op.products, True


def pyhessian_module():
    """PyHessian's ``pyhessian.hessian`` module (its package shadows it with the class)."""
    try:
        import importlib

        importlib.import_module("pyhessian")
        return sys.modules["pyhessian.hessian"]
    except ImportError:
        return None


def pyhessian(model, x, y, tol: float = 1e-3, max_iter: int = 100) -> tuple[float, int, bool]:
    ph = pyhessian_module()
    calls = {"n": 0}
    original = ph.hessian_vector_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    try:
        with warnings.catch_warnings():  # its backward(create_graph=True) warns of a cycle
            warnings.simplefilter("ignore", UserWarning)
            m = copy.deepcopy(model)
            h = ph.hessian(m, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            values, _ = h.eigenvalues(maxIter=max_iter, tol=tol)
        return float(values[0]), calls["n"], True
    finally:
        ph.hessian_vector_product = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, eval mode, "
        f"target relative error {TOL:g}, median of {args.repeats}"
    )
    header = (
        f"{'model':<12} {'method':<26} {'lambda_max':>12} {'true rel err':>13} "
        f"{'HVPs':>6} {'seconds':>8}"
    )
    for name in args.models.split(","):
        model, x, y = MODELS[name]()
        model.eval()
        run = functools.partial
        with sdpa_kernel(SDPBackend.MATH):
            true, floor = truth(model, x, y)
            first: list[int] = []
            ours_est, _, _ = ours(model, x, y, true=true, first=first)
            # power iteration in float32 cannot get closer than the floor: ask for at
            # least twice it
            achieved = max(abs(ours_est - true) / abs(true), 2 * floor)
            methods = {
                "ours (Lanczos)": (run(ours, model, x, y), args.repeats),
                "ours, random start": (run(ours, model, x, y, True), args.repeats),
                "power to 1e-3, random": (run(power, model, x, y, true), 1),
                "power to 1e-3, our start": (run(power, model, x, y, true, "gradient"), 1),
                f"power to {achieved:.0e} (ours)": (
                    run(power, model, x, y, true, "random", achieved),
                    1,
                ),
                "power, certified 1e-3": (run(power, model, x, y, None), 1),
                "scipy eigsh": (run(scipy_eigsh, model, x, y), args.repeats),
            }
            if pyhessian_module() is not None:
                methods["PyHessian default"] = (run(pyhessian, model, x, y), args.repeats)
                methods["PyHessian tol=1e-5"] = (run(pyhessian, model, x, y, 1e-5, 1000), 1)
            rows = {method: timed(fn, repeats) for method, (fn, repeats) in methods.items()}
        print(
            f"\n{name}: {sum(p.numel() for p in model.parameters()):,} params, "
            f"batch {list(x.shape)}, true lambda_max {true:.6g}, float32 floor {floor:.1e}"
        )
        print(header)
        for method, (est, hvps, secs, reached) in rows.items():
            print(
                f"{name:<12} {method:<26} {est:>12.6g} {abs(est - true) / abs(true):>13.2e} "
                f"{hvps:>6} {secs:>8.2f}{'' if reached else ' (limit)'}"
            )
        o = rows["ours (Lanczos)"]
        p_rand, p_ours = rows["power to 1e-3, random"], rows["power to 1e-3, our start"]
        p_cert = rows["power, certified 1e-3"]
        p_same = rows[f"power to {achieved:.0e} (ours)"]
        print(
            f"ours first within 1e-3 at step {first[0] if first else None}; HVPs, ours / power to 1e-3: "
            f"{o[1] / p_rand[1]:.2f}x (random start), {o[1] / p_ours[1]:.2f}x (our start); "
            f"ours / power to our accuracy: {o[1] / p_same[1]:.2f}x; "
            f"ours / power at the same certified bound: {o[1] / p_cert[1]:.2f}x"
        )
        ph = rows.get("PyHessian default")
        if ph is not None:
            tight = rows["PyHessian tol=1e-5"]
            print(
                f"wall time, ours / PyHessian default: {o[2] / ph[2]:.2f}x; "
                f"ours / PyHessian tol=1e-5: {o[2] / tight[2]:.2f}x"
            )
        else:
            print("PyHessian not installed (pip install -c constraints.txt '.[bench]')")


if __name__ == "__main__":
    main()
