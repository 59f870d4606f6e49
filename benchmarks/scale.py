"""nnhealth at scale: GPT-2-small and ViT-B/16 on one CPU box.

Rows (built from their configs with default init; no downloads):

* gpt2: ``transformers`` ``GPT2LMHeadModel(GPT2Config())``, a batch of 2 x 128 random
  token ids with labels = ids (the model's own LM loss, as nnhealth picks it);
* vit_b_16: ``torchvision.models.vit_b_16()``, a batch of 4 x 3 x 224 x 224 with random
  class labels (cross-entropy).

The models come from a factory module the script writes to a temporary directory
(``scale_models.py:gpt2`` returns the model and its batch), so the in-process
measurements and the CLI load exactly the same thing.

Columns, all from one run of this script:

* params; plain forward+backward (the loss nnhealth would take, ``autograd.grad``);
* the capture pass (``run_pass`` with the plan of a default scan, as ``nnhealth scan``
  runs it) and the weight statistics (``weight_stats.from_model``): median time over
  ``--repeats`` runs after one warm-up, the three interleaved in one process (so load
  from other processes hits them alike), as ratios to plain;
* peak RSS of plain and of capture: each in a fresh process that builds the model and
  runs the pass twice; peak = that process's ``ru_maxrss``, minus nothing (the baseline
  after building the model is shown too);
* curvature at the default tolerance (``measure_planned`` with the plan of
  ``--hessian``), in a fresh process: products, lambda_max and its bound, the Lanczos
  variant, time, and (peak RSS - plain peak RSS) in float64 parameter vectors
  (8 bytes x params, as the issue counts them: 0.7 GB for ViT-B, 1 GB for GPT-2);
* the whole default scan plus ``--hessian`` through the CLI (``python -m nnhealth scan
  scale_models.py:NAME --hessian``): wall time and peak RSS.

Every child runs under a watchdog: killed past ``--timeout`` seconds or ``--max-rss``
GB of RSS, and the row says so. Targets: capture <= 1.2x plain in time and in peak RSS;
curvature <= 30 products and <= 4 parameter vectors over plain. Informational: the exit
code is 0 unless something crashes.

    python benchmarks/scale.py [--quick] [--only NAME] [--repeats N] [--threads N]
                               [--part all|capture|hessian] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CAPTURE_TARGET = 1.2
PRODUCTS_TARGET = 30
VECTORS_TARGET = 4.0
MODELS = {"gpt2": "transformers", "vit_b_16": "torchvision"}

FACTORIES = '''"""Models for benchmarks/scale.py: each factory returns (model, batch)."""

import torch

QUICK = {quick}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()
    model = GPT2LMHeadModel(config)
    shape = (1, 32) if QUICK else (2, 128)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, shape, generator=gen)
    return model, {{"input_ids": ids, "labels": ids}}


def vit_b_16():
    from torchvision.models import vit_b_16 as build

    torch.manual_seed(0)
    model = build()
    n = 1 if QUICK else 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 224, 224, generator=gen)
    return model, (x, torch.randint(0, 1000, (n,), generator=gen))
'''


# ---- children: one measurement each, in a fresh process ------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _setup(factory: str, hessian: bool = False) -> dict[str, Any]:
    """The model, inputs and loss as ``nnhealth scan`` prepares them, and the plan of a
    default scan (with ``hessian``: of ``--hessian``)."""
    import torch

    from nnhealth.analyzers import select_checks
    from nnhealth.loading.batch import interpret, prepare
    from nnhealth.loading.loss import objective
    from nnhealth.loading.model import load_model
    from nnhealth.options import ScanOptions
    from nnhealth.plan import is_opt_in, make_plan

    loaded = load_model(factory)
    model = loaded.model.train()
    dtype = next(p.dtype for p in model.parameters())
    prepared = prepare(interpret(loaded.example, factory), dtype, torch.device("cpu"))
    inputs, resolver = objective(model, prepared.inputs, prepared.targets, "auto", 0, None)
    opts = ScanOptions(hessian=True) if hessian else ScanOptions()
    checks = [c for c in select_checks(None, None) if hessian or not is_opt_in(c)]
    plan = make_plan([(c, c.defaults()) for c in checks], opts)
    return {
        "model": model,
        "inputs": inputs,
        "resolver": resolver,
        "plan": plan,
        "examples": prepared.examples,
        "batch": prepared,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _runners(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from nnhealth.capture import weights as weight_stats
    from nnhealth.capture.instrument import call_model, run_pass

    model, inputs, resolver, plan = (case[k] for k in ("model", "inputs", "resolver", "plan"))
    params = [p for p in model.parameters() if p.requires_grad]
    sites: list[Any] = []

    def plain() -> None:
        torch.autograd.grad(resolver(call_model(model, inputs)), params)

    def capture() -> None:
        captured = run_pass(model, inputs, resolver, plan, examples=case["examples"])
        sites[:] = [captured.sites]

    def weights() -> None:
        weight_stats.from_model(model, sites[0] if sites else (), plan.symmetry_rtol)

    return {"plain": plain, "capture": capture, "weights": weights}


def child_time(factory: str, repeats: int) -> dict[str, Any]:
    """Median seconds of plain, capture and weights, interleaved after one warm-up."""
    case = _setup(factory)
    runners = _runners(case)
    for run in runners.values():
        run()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            samples[key].append(time.perf_counter() - start)
    return {
        "params": case["params"],
        **{f"{k}_s": statistics.median(v) for k, v in samples.items()},
        **{f"{k}_samples": v for k, v in samples.items()},
    }


def child_memory(factory: str, path: str) -> dict[str, Any]:
    """Peak RSS of a process that builds the model and runs ``path`` twice."""
    case = _setup(factory)
    base = _maxrss_mb()
    run = _runners(case)[path]
    for _ in range(2):
        run()
    return {"baseline_mb": base, "peak_mb": _maxrss_mb()}


def child_curvature(factory: str) -> dict[str, Any]:
    """Curvature as the scan measures it with ``--hessian``, alone in this process."""
    from dataclasses import replace

    from nnhealth.curvature.measure import measure_planned
    from nnhealth.runner import hessian_examples

    case = _setup(factory, hessian=True)
    base = _maxrss_mb()
    resolver = case["resolver"]
    # as the scan takes them: on blocks of the batch when its graph is over its allowance
    examples = hessian_examples(replace(case["batch"], targets=resolver.targets), resolver)
    start = time.perf_counter()
    stats, reason, notes = measure_planned(
        case["model"],
        resolver.with_labels(case["inputs"]),
        resolver,
        case["plan"],
        examples=examples,
    )
    seconds = time.perf_counter() - start
    out = {"baseline_mb": base, "peak_mb": _maxrss_mb(), "seconds": seconds, "notes": notes}
    out["params"] = case["params"]
    if stats is None:
        return {**out, "reason": reason}
    report = stats.to_dict()
    keys = (
        "hvps",
        "lanczos_hvps",
        "converged",
        "lanczos",
        "basis_dtype",
        "lambda_max_error",
        "blocks",
    )
    return {**out, "lambda_max": report["top_eigenvalues"][0], **{k: report.get(k) for k in keys}}


# ---- the parent: children under a watchdog -------------------------------------------


def _vm_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def watched(cmd: list[str], timeout: float, max_rss_gb: float) -> dict[str, Any]:
    """Run ``cmd``; its exit code, stdout, wall time and peak RSS (wait4's ru_maxrss),
    killed past ``timeout`` seconds or ``max_rss_gb`` of RSS (``killed`` says which)."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, text=True)
        start, killed = time.perf_counter(), None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            rss = _vm_rss_mb(proc.pid)
            if killed is None and (elapsed > timeout or rss > max_rss_gb * 1024):
                why = f"{elapsed:.0f} s" if elapsed > timeout else f"RSS {rss / 1024:.1f} GB"
                killed = f"killed at {why} (limits {timeout:.0f} s, {max_rss_gb:g} GB)"
                proc.kill()
            time.sleep(0.2)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    return {
        "rc": proc.returncode,
        "stdout": text,
        "wall_s": wall,
        "peak_mb": usage.ru_maxrss / 1024,
        "killed": killed,
    }


def _child(args: argparse.Namespace, factory: str, *what: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", factory, *what]
    cmd += ["--repeats", str(args.repeats)]
    done = watched(cmd, args.timeout, args.max_rss)
    if done["rc"] != 0 or done["killed"]:
        return {"error": done["killed"] or f"exit {done['rc']}", "peak_mb": done["peak_mb"]}
    return json.loads(done["stdout"].strip().splitlines()[-1])


def _cli(args: argparse.Namespace, factory: str, workdir: Path) -> dict[str, Any]:
    """``nnhealth scan FACTORY --hessian`` through the CLI: wall time, peak RSS, the
    curvature it reported."""
    report = workdir / "report.json"
    cmd = [sys.executable, "-m", "nnhealth", "scan", factory, "--hessian", "-q"]
    cmd += ["--format", "json", "-o", str(report)]
    done = watched(cmd, args.timeout, args.max_rss)
    row = {"wall_s": done["wall_s"], "peak_mb": done["peak_mb"], "rc": done["rc"]}
    if done["killed"] or done["rc"] not in (0, 1):
        return {**row, "error": done["killed"] or f"exit {done['rc']}"}
    curvature = json.loads(report.read_text()).get("curvature") or {}
    return {**row, "hvps": curvature.get("hvps"), "lanczos": curvature.get("lanczos")}


def measure(args: argparse.Namespace, name: str, workdir: Path) -> dict[str, Any]:
    factory = f"{workdir / 'scale_models.py'}:{name}"
    row: dict[str, Any] = {"model": name, "time": {"error": "not run"}}
    if args.part != "hessian":
        print(f"{name}: timing plain / capture / weights ...", file=sys.stderr)
        row["time"] = _child(args, factory, "time")
    for path in ("plain", "capture") if args.part != "hessian" else ("plain",):
        print(f"{name}: peak RSS of {path} ...", file=sys.stderr)
        row[f"mem_{path}"] = _child(args, factory, "memory", path)
    row.setdefault("mem_capture", {"error": "not run"})
    if args.part != "capture":
        print(f"{name}: curvature ...", file=sys.stderr)
        row["curvature"] = _child(args, factory, "curvature")
        if not args.no_cli:
            print(f"{name}: nnhealth scan --hessian through the CLI ...", file=sys.stderr)
            row["cli"] = _cli(args, factory, workdir)
    return row


# ---- the table -------------------------------------------------------------------------


def _ok(value: float | None, target: float) -> str:
    return "?" if value is None else ("met" if value <= target else "MISSED")


def derived(row: dict[str, Any]) -> dict[str, Any]:
    """The ratios of one row (None where a measurement failed)."""
    t, plain, cap = row["time"], row["mem_plain"], row["mem_capture"]
    curv = row.get("curvature") or {}
    d: dict[str, Any] = {"params": t.get("params") or curv.get("params")}
    if "error" not in t:
        d["time_x"] = t["capture_s"] / t["plain_s"]
        d["weights_x"] = t["weights_s"] / t["plain_s"]
    if "error" not in plain and "error" not in cap:
        d["rss_x"] = cap["peak_mb"] / plain["peak_mb"]
    if d["params"] and "error" not in plain and "peak_mb" in curv and "error" not in curv:
        d["vectors"] = (curv["peak_mb"] - plain["peak_mb"]) * 2**20 / (8 * d["params"])
    return d


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | params | plain f+b | plain peak RSS (baseline) | capture time | capture RSS "
        "| weight stats | curvature: products, λmax ± bound, Lanczos, time | curvature RSS "
        "over plain | `scan --hessian` (CLI) |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in rows:
        d, t, plain = derived(row), row["time"], row["mem_plain"]
        curv, cli = row.get("curvature") or {}, row.get("cli") or {}
        cells = [
            row["model"],
            _fmt(d["params"] and d["params"] / 1e6, ".1f", "M"),
            t.get("error") or f"{t['plain_s']:.2f} s",
            plain.get("error")
            or f"{plain['peak_mb'] / 1024:.2f} GB ({plain['baseline_mb'] / 1024:.2f} GB)",
            _fmt(d.get("time_x"), ".2f", "x"),
            row["mem_capture"].get("error") or _fmt(d.get("rss_x"), ".2f", "x"),
            _fmt(d.get("weights_x"), ".2f", "x")
            + ("" if "error" in t else f" ({t['weights_s']:.2f} s)"),
            _curvature_cell(curv),
            _fmt(d.get("vectors"), ".1f", " vectors"),
            _cli_cell(cli),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curvature_cell(curv: dict[str, Any]) -> str:
    if not curv:
        return "not run"
    if "error" in curv:
        return f"{curv['error']}, peak {curv['peak_mb'] / 1024:.1f} GB"
    if "reason" in curv:
        return f"none: {curv['reason']}"
    return (
        f"{curv['hvps']}, {curv['lambda_max']:.4g} ± {curv['lambda_max_error']:.1e}, "
        f"{curv['lanczos']} ({curv['basis_dtype']}), {curv['seconds']:.0f} s"
    )


def _cli_cell(cli: dict[str, Any]) -> str:
    if not cli:
        return "not run"
    rss = f"peak {cli['peak_mb'] / 1024:.1f} GB"
    if "error" in cli:
        return f"{cli['error']}, {rss}"
    return f"{cli['wall_s'] / 60:.1f} min, {rss}, {cli['hvps']} products ({cli['lanczos']})"


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        d, curv = derived(row), row.get("curvature") or {}
        marks = [
            f"capture time <= {CAPTURE_TARGET}x: {_ok(d.get('time_x'), CAPTURE_TARGET)}",
            f"capture RSS <= {CAPTURE_TARGET}x: {_ok(d.get('rss_x'), CAPTURE_TARGET)}",
        ]
        if curv:
            marks.append(f"products <= {PRODUCTS_TARGET}: {_ok(curv.get('hvps'), PRODUCTS_TARGET)}")
            marks.append(
                f"curvature RSS <= plain + {VECTORS_TARGET:g} vectors: "
                f"{_ok(d.get('vectors'), VECTORS_TARGET)}"
            )
        out.append(f"{row['model']}: " + "; ".join(marks))
    return out


def _missing(library: str) -> str | None:
    return None if importlib.util.find_spec(library) else f"{library} is not installed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 repeats: a smoke run")
    parser.add_argument("--only", choices=sorted(MODELS), help="one model")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path")
    parser.add_argument(
        "--part",
        choices=("all", "capture", "hessian"),
        default="all",
        help="capture: the capture columns only; hessian: plain RSS, curvature and the CLI",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--max-rss", type=float, default=14.0, help="GB of RSS per child")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--no-cli", action="store_true", help="leave out the whole CLI scan (the longest part)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:  # children inherit it (torch reads it at import)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        factory, kind, *rest = args.child
        if kind == "time":
            result = child_time(factory, args.repeats)
        elif kind == "memory":
            result = child_memory(factory, rest[0])
        else:
            result = child_curvature(factory)
        print(json.dumps(result))
        return 0
    args.repeats = 2 if args.quick else args.repeats
    rows = []
    with tempfile.TemporaryDirectory(prefix="nnhealth-scale-") as tmp:
        workdir = Path(tmp)
        (workdir / "scale_models.py").write_text(FACTORIES.format(quick=args.quick))
        for name, library in MODELS.items():
            if args.only and name != args.only:
                continue
            missing = _missing(library)
            if missing:
                print(f"skipped {name}: {missing}", file=sys.stderr)
                continue
            rows.append(measure(args, name, workdir))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(table(rows))
    print("\n".join(verdicts(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
