"""The zoo table: stock torchvision, timm and transformers models (built from their
configs, default init, no downloads; the same catalog as ``tests/zoo``), each scanned
by ``nnhealth.scan`` with the default checks, against a plain forward+backward of the
same model, batch and loss.

Columns: parameters; plain forward+backward time; scan time and its ratio to plain
(medians of ``--repeats`` runs after one warm-up, interleaved); peak RSS increase of the
plain pass and of the scan (each model in a fresh subprocess; the kernel's high-water
mark is reset through /proc/self/clear_refs before each, so both are measured from the
same resident baseline, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back
to the OS; Linux only); the findings (errors/warnings/infos).

A library that does not import is skipped with a message. The exit code is 0 unless
something crashes.

    python benchmarks/zoo.py [--repeats N] [--quick] [--hessian] [--json] [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CATALOG_FILE = ROOT / "tests" / "zoo" / "conftest.py"


def _catalog() -> Any:
    spec = importlib.util.spec_from_file_location("nnhealth_zoo_catalog", CATALOG_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _status(field: str) -> int:
    """VmRSS / VmHWM of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak(run: Any) -> float | None:
    """Peak RSS increase (MB) over ``run()``, from the current resident baseline."""
    if not _reset_peak():
        return None
    base = _status("VmRSS")
    run()
    return (_status("VmHWM") - base) / 1024


def _plain_step(model: Any, batch: Any) -> Any:
    """Forward, the loss nnhealth would pick, backward: what a training step costs."""
    import torch

    from nnhealth.loading.batch import interpret
    from nnhealth.loading.loss import LossResolver

    data = interpret(batch, "benchmark")
    resolver = LossResolver("auto", data.targets, 0)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        inputs = data.inputs
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        torch.autograd.grad(resolver(out), params)

    return step


def measure(name: str, repeats: int, hessian: bool) -> dict[str, Any]:
    """One model, in this (child) process."""
    import torch

    import nnhealth

    catalog = _catalog()
    torch.manual_seed(0)
    model = catalog.BY_NAME[name].build()
    batch = catalog.BY_NAME[name].batch()
    model.train()
    plain = _plain_step(model, batch)

    def scan() -> Any:
        return nnhealth.scan(model, batch, hessian=hessian)

    plain()  # warm-up
    report = scan()
    times: dict[str, list[float]] = {"plain": [], "scan": []}
    for _ in range(repeats):
        for key, fn in (("plain", plain), ("scan", scan)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    plain_s, scan_s = statistics.median(times["plain"]), statistics.median(times["scan"])
    counts = report.counts()
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "plain_s": plain_s,
        "scan_s": scan_s,
        "ratio": scan_s / plain_s,
        "plain_peak_mb": _peak(plain),
        "scan_peak_mb": _peak(scan),
        "findings": f"{counts['error']}/{counts['warning']}/{counts['info']}",
        "codes": sorted({f.code for f in report.findings if f.severity.label != "info"}),
    }


def _child(name: str, repeats: int, hessian: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--repeats", str(repeats)]
    cmd += ["--hessian"] if hessian else []
    # large blocks mmapped, so freed memory goes back to the OS and each pass's peak shows
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    if done.returncode != 0:
        return {"model": name, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _available(catalog: Any, library: str) -> str | None:
    """None when ``library`` imports, else why not."""
    try:
        catalog.library(library)
    except BaseException as exc:  # noqa: BLE001 - pytest.skip raises a BaseException
        return str(exc)
    return None


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| model | params | plain f+b | scan | scan/plain | peak RSS plain | peak RSS scan | e/w/i |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['error']} |||||||")
            continue
        mb = [
            "n/a" if r[k] is None else f"{max(r[k], 0.0) + 0.0:.0f} MB"  # -0: noise
            for k in ("plain_peak_mb", "scan_peak_mb")
        ]
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['plain_s'] * 1e3:.0f} ms "
            f"| {r['scan_s'] * 1e3:.0f} ms | {r['ratio']:.2f}x | {mb[0]} | {mb[1]} "
            f"| {r['findings']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repeat per model")
    parser.add_argument("--hessian", action="store_true", help="scan with --hessian too")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--only", default="", help="models whose name contains this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if args.child:
        print(json.dumps(measure(args.child, repeats, args.hessian)))
        return 0
    catalog = _catalog()
    rows = []
    for library in sorted({m.library for m in catalog.CATALOG}):
        missing = _available(catalog, library)
        if missing:
            print(f"skipped {library}: {missing}", file=sys.stderr)
            continue
        for model in catalog.CATALOG:
            if model.library == library and args.only in model.name:
                print(f"measuring {model.name} ...", file=sys.stderr)
                rows.append(_child(model.name, repeats, args.hessian))
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
