"""The command line: parse, call, render, exit. Heavy imports (torch) happen inside
the commands, so ``nnhealth --help``, ``checks`` and ``explain`` stay instant."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import shutil
import sys
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Self

import typer

try:  # typer >= 0.2x vendors click; its exceptions derive from TyperException
    from typer import TyperException as _CliError
except ImportError:  # older typer on top of click
    from click import ClickException as _CliError

from nnhealth import __version__, options
from nnhealth._util import escaped, first_line, out_of_memory
from nnhealth.errors import NnhealthError, UsageError

if TYPE_CHECKING:
    from nnhealth.config import Settings
    from nnhealth.findings import Report

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Diagnose a PyTorch model's training health in one instrumented pass.",
)

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nnhealth {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Diagnose a PyTorch model's training health in one instrumented pass."""


class _DelayedStatus:
    """Progress on stderr, shown only if the work takes more than a moment and stderr is
    a terminal: a spinner and the current stage, plus a bar when the stage has steps
    (Lanczos: step k of the product budget, the current estimate and its bound)."""

    def __init__(self, enabled: bool, delay: float = 0.4) -> None:
        self.enabled = enabled
        self.delay = delay
        self.message = "loading"
        self.steps: tuple[int, int] | None = None
        self._status = None  # the rich Progress, once shown
        self._task = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    def __enter__(self) -> Self:
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        # a bar and a count only while the stage has steps (a task field: rich's update
        # cannot set total back to None, so total alone would keep a stale bar)
        class StepsBar(BarColumn):
            def render(self, task):  # rich's column interface
                return super().render(task) if task.fields.get("has_steps") else ""

        class StepsCount(TextColumn):
            def render(self, task):
                return super().render(task) if task.fields.get("has_steps") else ""

        with self._lock:
            if self._closed:
                return
            self._status = Progress(
                SpinnerColumn(),
                TextColumn("nnhealth: {task.description}"),
                StepsBar(bar_width=12),
                StepsCount("{task.completed}/{task.total}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._status.add_task(self.message, total=None, has_steps=False)
            self._show()
            self._status.start()

    def _show(self) -> None:
        completed, total = self.steps if self.steps else (0, None)
        self._status.update(
            self._task,
            description=f"{self.message}…",
            completed=completed,
            total=total,
            has_steps=self.steps is not None,
        )

    def update(self, message: str, steps: tuple[int, int] | None = None) -> None:
        """Show ``message``; ``steps`` = (done, total) draws a bar."""
        with self._lock:
            self.message = message
            self.steps = steps
            if self._status is not None and not self._closed:
                self._show()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Remove the progress line (before the report is written, so a terminal does
        not show the spinner in front of it); later updates are ignored."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._status is not None:
                self._status.stop()


def _module_files(target: str) -> list[Path]:
    """The source files ``import target`` would run (each package's ``__init__`` and the
    module itself), found on sys.path and the current directory without importing."""
    import importlib.machinery

    search = [os.getcwd(), *sys.path]
    out: list[Path] = []
    for part in target.split("."):
        if not part.isidentifier():
            return out
        try:
            spec = importlib.machinery.PathFinder.find_spec(part, search)
        except (ImportError, ValueError, OSError):
            return out
        if spec is None:
            return out
        if spec.origin and spec.has_location:
            out.append(Path(spec.origin))
        if not spec.submodule_search_locations:
            return out
        search = list(spec.submodule_search_locations)
    return out


def _user_files(*specs: str | None) -> list[Path]:
    """The files a scan reads: model/data/weights paths, entry points' .py files and the
    module files a pkg.module:factory entry point resolves to."""
    out = []
    for spec in specs:
        if not spec:
            continue
        out.append(Path(spec))
        if ":" in spec:
            target = spec.rpartition(":")[0]
            out.append(Path(target))
            if not target.endswith(".py"):
                out.extend(_module_files(target))
    return out


def _loaded_sources() -> list[Path]:
    """Every Python source file imported so far (the model's own code among them)."""
    out = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            out.append(Path(file))
    return out


def _refuse_overwrite(flag: str, target: Path | None, files: list[Path]) -> None:
    """Refuse ``target`` when it is one of ``files`` (same inode: symlinks and hard links
    included). A target that does not exist yet overwrites nothing."""
    try:
        own = os.stat(target) if target is not None else None
    except OSError:
        return
    for f in files if own is not None else ():
        try:
            same = os.path.samestat(own, os.stat(f))
        except OSError:
            continue
        if same:
            raise UsageError(
                f"{flag} {target}: refusing to overwrite the model, data or source file"
            )


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capture
        return None


def _flush_c_stdio() -> None:
    """Flush the C library's stdout buffer (printf from an extension) before the file
    descriptor under it changes."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


def _send_stdout_to(fd: int) -> None:
    """Point sys.stdout's file descriptor at ``fd``, after flushing what Python and the C
    library buffered for it."""
    out_fd = _fileno(sys.stdout)
    if out_fd is None or out_fd == fd:
        return
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    _flush_c_stdio()
    with contextlib.suppress(OSError):
        os.dup2(fd, out_fd)


@contextlib.contextmanager
def _stdout_to_stderr():
    """While the scan runs (user code included), send what is written to stdout, from
    Python (sys.stdout) and C (file descriptor 1), to stderr; yield a stream on the real
    stdout for the report. Restored afterwards."""
    real = sys.stdout
    out_fd, err_fd = _fileno(real), _fileno(sys.stderr)
    saved = None
    report_stream = real
    if out_fd is not None and err_fd is not None and out_fd != err_fd:
        saved = os.dup(out_fd)
        _send_stdout_to(err_fd)
        report_stream = open(  # noqa: SIM115 (closed in finally; the fd is closed there too)
            saved, "w", encoding=real.encoding or "utf-8", closefd=False
        )
    sys.stdout = sys.stderr
    try:
        yield report_stream
    finally:
        sys.stdout = real
        if saved is not None:
            with contextlib.suppress(OSError):
                report_stream.close()
            _send_stdout_to(saved)
            os.close(saved)


def _silence(stream) -> None:
    """After a broken pipe, point ``stream``'s file descriptor (the report's) at
    /dev/null, so that flushing what it still buffers does not raise again."""
    fd = _fileno(stream)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)


def _write(stream, text: str) -> None:
    """Write to a text stream that may not encode every character (paths are bytes)."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.buffer.write(text.encode(encoding, "backslashreplace"))
    stream.flush()


def _resolve(ctx: typer.Context) -> tuple[dict[str, Any], Settings]:
    """Every option's value: the command line's, else NNHEALTH_*, else the config
    file's, else the default; checked, in the form the scan uses (paths as Path)."""
    from nnhealth import config

    params = ctx.params
    given = {
        name
        for name in params
        if (source := ctx.get_parameter_source(name)) is not None
        and source.name in ("COMMANDLINE", "ENVIRONMENT")
    }
    settings = config.resolve(given, params["config"], trust=bool(params["trust"]))
    merged = {**options.DEFAULTS, **{n: params[n] for n in given}, **settings.values}
    values = {n: options.BY_NAME[n].kind.coerce(v) for n, v in merged.items()}
    options.check_values(values)
    for name, value in values.items():
        if value is not None and isinstance(options.BY_NAME[name].kind, options.File):
            values[name] = Path(value)  # a config file's paths are strings
    return values, settings


def _check_targets(values: dict[str, Any]) -> None:
    """A model to scan, and report files that overwrite none of the scan's inputs."""
    if values["model"] is None:
        model = options.BY_NAME["model"]
        raise UsageError(
            f"no MODEL: give it on the command line, as {model.env}, or as {model.key} in "
            "[tool.nnhealth] (pyproject.toml) or nnhealth.toml"
        )
    user_files = _user_files(
        *(values[k] for k in ("model", "data", "weights", "arch", "optimizer_state"))
    )
    for flag, target in (("-o", values["output"]), ("--write-baseline", values["write_baseline"])):
        _refuse_overwrite(flag, target, user_files)
        if target is not None and target.is_dir():  # /dev/null and pipes are fine
            raise UsageError(f"{flag} {target}: is a directory; give a file path")


def _load(values: dict[str, Any], status: _DelayedStatus) -> tuple[Any, Any]:
    """The model and the batch the options name (the batch may be None)."""
    from nnhealth.loading.batch import interpret, load_batch, parse_shape, synthetic
    from nnhealth.loading.model import load_model

    model, data, weights, arch = (values[k] for k in ("model", "data", "weights", "arch"))
    shape = parse_shape(values["input_shape"]) if values["input_shape"] else None
    status.update("loading the model")
    if arch:
        loaded = load_model(arch, weights=model)
    else:
        loaded = load_model(model, trust=values["trust"], weights=weights)
    if values["optimizer_state"]:
        from nnhealth.loading.training_state import read_optimizer_state

        status.update("loading the optimizer state")
        saved = read_optimizer_state(Path(values["optimizer_state"]))
        loaded.optimizer = replace(saved, explicit=True)
    if data:
        status.update("loading the batch")
        return loaded, load_batch(data)
    if shape is not None:
        return loaded, synthetic(shape, values["seed"], loaded.model)
    if loaded.example is not None:
        return loaded, interpret(loaded.example, f"{model} (example batch)")
    return loaded, None


def _render(report: Report, values: dict[str, Any], stream: Any) -> str:
    from nnhealth.formatters import RenderOptions, get_formatter

    to_terminal = values["output"] is None and stream is not None and stream.isatty()
    # a terminal's own width; files, pipes and CI logs get room for the whole table
    width = shutil.get_terminal_size((120, 24)).columns if to_terminal else 140
    render = RenderOptions(
        color=to_terminal and "NO_COLOR" not in os.environ,
        width=max(width, 80),
        verbose=values["verbose"],
        quiet=values["quiet"],
        fail_on=values["fail_on"],
    )
    return get_formatter(values["fmt"], render).render(report)


def _emit(text: str, output: Path | None, stream: Any) -> None:
    """The report to ``output``, else to ``stream`` (the real stdout)."""
    if output is not None:
        try:
            output.write_text(text, encoding="utf-8", errors="backslashreplace")
        except OSError as exc:
            raise UsageError(f"-o {output}: cannot write ({exc.strerror})") from exc
        return
    try:
        if stream is None:  # started with stdout closed (>&-)
            raise OSError(9, "standard output is closed")
        _write(stream, text)
    except BrokenPipeError:
        _silence(stream)  # `nnhealth scan ... | head`: the reader left
    except OSError as exc:
        raise UsageError(
            f"cannot write the report to standard output ({exc.strerror}); "
            "write it to a file with -o FILE"
        ) from exc


def _exit_code(report: Report, values: dict[str, Any]) -> int:
    """0, 1 or 2; a baseline written accepts the findings as they are."""
    from nnhealth.findings import Severity

    if report.errors:
        return EXIT_ERROR
    if values["write_baseline"] is not None:
        return EXIT_OK
    if values["exit_zero"] or report.ok(Severity.parse(values["fail_on"])):
        return EXIT_OK
    return EXIT_FINDINGS


def scan(ctx: typer.Context, **params: Any) -> int:
    """Scan MODEL on one batch and report what is wrong, where, and how to fix it.

    Options not given here come from NNHEALTH_* environment variables, then from the
    config file, then the defaults. Under torchrun, every rank scans its shard of the
    batch and rank 0 writes the report.
    """
    from nnhealth import distributed

    values, settings = _resolve(ctx)
    _check_targets(values)
    opts = options.scan_options(
        values,
        check_options=settings.check_options,
        severities=settings.severities,
        layer_ignores=settings.layer_ignores,
    )
    with distributed.joined() as ranks, distributed.failures(ranks):
        code = _scan(values, opts, ranks)
        return distributed.broadcast_code(code, ranks)


def _scan(values: dict[str, Any], opts: Any, ranks: Any) -> int:
    """The scan on this process (one rank's part of it under torchrun); the report
    written by rank 0 only. Returns the exit code."""
    from nnhealth import distributed, pipeline

    output, write_baseline = values["output"], values["write_baseline"]
    writer = ranks is None or ranks.rank == 0
    interactive = sys.stderr.isatty() and not values["quiet"] and writer
    with _DelayedStatus(interactive) as status, _stdout_to_stderr() as report_stream:
        # user code (factories, forward, TorchScript print) may print: while it runs,
        # stdout goes to stderr, so the report on stdout stays well-formed JSON/SARIF
        loaded, batch = _load(values, status)
        if ranks is not None:
            if batch is not None:
                batch = distributed.shard(batch, ranks)
            if loaded.model is not None and distributed.broadcast_model(loaded.model, ranks):
                loaded.notes.append(
                    "distributed: the ranks loaded different weights (a factory that "
                    "initializes at random); every rank scanned rank 0's, as DDP would"
                )
        report = pipeline.run(
            loaded,
            batch,
            opts,
            progress=status.update,
            **options.in_scope(values, options.Scope.PIPELINE),
        )
        if not writer:
            return _exit_code(report, values)
        # the code the scan imported (an entry point's modules) is never overwritten
        sources = _loaded_sources()
        _refuse_overwrite("-o", output, sources)
        _refuse_overwrite("--write-baseline", write_baseline, sources)
        rendered = _render(report, values, report_stream)
        status.stop()
        _emit(rendered, output, report_stream)
    if write_baseline is not None:
        from nnhealth import baseline as baselines

        try:
            baselines.write(report, write_baseline)
        except OSError as exc:
            raise UsageError(
                f"--write-baseline {write_baseline}: cannot write ({exc.strerror})"
            ) from exc
    return _exit_code(report, values)


def _parameter(option: options.Option) -> inspect.Parameter:
    """``option`` as a typer parameter of ``scan``."""
    if option.argument:
        info = typer.Argument(help=option.help, show_default=option.show_default)
    else:
        info = typer.Option(
            *option.flags,
            help=option.help,
            show_default=option.show_default,
            envvar=option.env if option.early else None,
        )
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=option.default,
        annotation=Annotated[option.annotation, info],
    )


# the command's parameters are the options' declarations (nnhealth.options.OPTIONS)
scan.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_parameter(o) for o in options.OPTIONS),
    ],
    return_annotation=int,
)
app.command()(scan)


@app.command()
def explain(
    code: Annotated[str, typer.Argument(help="A check code (NH101) or name (dead-relu).")],
) -> int:
    """Print what a check detects, why it matters, an example, the fix and its options."""
    from nnhealth.analyzers import lookup

    check = lookup(code)
    if check is None:
        raise UsageError(f"unknown check {code!r}; `nnhealth checks` lists them")
    lines = [f"{check.code} {check.name}", "", check.doc(), ""]
    if check.options:
        lines.append("Options:")
        for opt in check.options:
            lines.append(f"    {opt.name} = {opt.default}: {opt.doc}")
    else:
        lines.append("Options: none")
    lines.append("")
    lines.append(f"Needs: {', '.join(sorted(check.needs))}")
    lines.append("")
    lines.append(
        "Check the fix before you train: `nnhealth scan MODEL --what-if` applies each "
        "recommended fix to a copy of the model and re-runs this check on the same batch."
    )
    typer.echo("\n".join(lines))
    return EXIT_OK


@app.command("checks")
def list_checks() -> int:
    """List every check with its code, name and what it needs."""
    from rich.console import Console
    from rich.table import Table

    from nnhealth.analyzers import REGISTRY

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("code")
    table.add_column("name")
    table.add_column("needs")
    table.add_column("what it looks at")
    for c in REGISTRY:
        table.add_row(c.code, c.name, ", ".join(sorted(c.needs)), c.summary)
    width = shutil.get_terminal_size((140, 24)).columns if sys.stdout.isatty() else 140
    console = Console(highlight=False, width=max(width, 100), record=True, file=io.StringIO())
    console.print(table)
    typer.echo("\n".join(line.rstrip() for line in console.export_text().splitlines()))
    return EXIT_OK


@app.command()
def report(
    history: Annotated[
        Path, typer.Argument(help="A training history nnhealth.Monitor wrote (JSON lines).")
    ],
    fmt: Annotated[
        options.ReportFormat,
        typer.Option("--format", help="text: trends in the terminal; json; html: one page."),
    ] = options.ReportFormat.text,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report to this file instead of stdout."),
    ] = None,
    fail_on: Annotated[
        options.ReportLevel,
        typer.Option(
            "--fail-on",
            help="Exit 1 when a verdict over time, or a finding of the latest capture step, "
            "is at or above this severity (never: exit 0).",
        ),
    ] = options.ReportLevel.error,
) -> int:
    """Report a training history: trends per layer, lambda_max against its limit, and the
    verdicts over time (dead units rising, the edge of stability, drifting updates, the
    first non-finite value)."""
    from nnhealth import history as histories
    from nnhealth import trends
    from nnhealth.findings import Severity

    _refuse_overwrite("-o", output, [history])
    if output is not None and output.is_dir():
        raise UsageError(f"-o {output}: is a directory; give a file path")
    lines = histories.read(history)
    verdicts = histories.verdicts(lines)
    source = str(history)
    if fmt == options.ReportFormat.json:
        text = trends.to_json(lines, verdicts)
    elif fmt == options.ReportFormat.html:
        from nnhealth.formatters.html import history_page

        text = history_page(source, lines, verdicts)
    else:
        text = trends.render_text(source, lines, verdicts, _history_render(output))
    _emit(text, output, sys.stdout)
    if fail_on == options.ReportLevel.never:
        return EXIT_OK
    threshold = Severity.parse(fail_on.value)
    counted = trends.gating(verdicts, trends.latest(lines)[1])
    return EXIT_FINDINGS if any(f.severity >= threshold for f in counted) else EXIT_OK


def _history_render(output: Path | None) -> Any:
    """The text view's options: a terminal's width and colour, else 140 columns."""
    from nnhealth.formatters import RenderOptions

    to_terminal = output is None and sys.stdout.isatty()
    width = shutil.get_terminal_size((120, 24)).columns if to_terminal else 140
    return RenderOptions(color=to_terminal and "NO_COLOR" not in os.environ, width=max(width, 80))


def _wants_debug(argv: list[str]) -> bool:
    """--debug or NNHEALTH_DEBUG, seen before the arguments are parsed (a parse error
    shows its traceback too)."""
    debug = options.BY_NAME["debug"]
    try:
        from_env = debug.kind.parse(os.environ.get(debug.env, ""))
    except ValueError:
        from_env = False
    return any(f in argv for f in debug.flags) or from_env


def _fail(message: str) -> None:
    """One line on stderr. Messages quote paths and layer names from the file: control
    characters (ESC, CR, newlines) are written out, never sent to the terminal raw."""
    from nnhealth.formatters.base import visible

    _write(sys.stderr, f"nnhealth: error: {visible(message)}\n")


def _unexpected(exc: BaseException) -> str:
    """One line for what no stage turned into an NnhealthError."""
    if out_of_memory(exc):
        return (
            f"out of memory ({first_line(exc)[:160]}); use a smaller batch (--input-shape, "
            "--data), fewer checks (--select), or a machine with more memory"
        )
    if isinstance(exc, RecursionError):
        return (
            "an input is nested too deeply to process (Python's recursion limit was "
            "reached); check the model, batch, config and baseline files"
        )
    if not isinstance(exc, Exception):  # SystemExit or another BaseException: user code
        return (
            f"code run by the scan (the model, its loss or its factory) {escaped(exc)}; "
            "rerun with --debug to see where"
        )
    return (
        f"internal error ({type(exc).__name__}: {first_line(exc)}); this is a bug in "
        "nnhealth: rerun with --debug and report the traceback"
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns (and exits with) 0, 1 or 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(args)
    if not args:
        args = ["--help"]
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="nnhealth", standalone_mode=False)
        code = rv if isinstance(rv, int) else EXIT_OK
    except _CliError as exc:  # bad option, unknown option, bad value
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(exc.format_message().replace("\n", " ") + hint)
        code = EXIT_ERROR
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _fail("interrupted")
        code = EXIT_ERROR
    except NnhealthError as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.render(options.FLAGS))
        code = EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted")
        code = EXIT_ERROR
    except BaseException as exc:  # noqa: BLE001 (every escape ends in one line and exit 2)
        if debug:
            traceback.print_exc()
        _fail(_unexpected(exc))
        code = EXIT_ERROR
    if argv is None:
        _retire_stdout()
        sys.exit(code)
    return code


def _retire_stdout() -> None:
    """The report is out: whatever still writes to stdout before the process ends (user
    code's atexit handlers, __del__ at shutdown, threads it started) goes to stderr."""
    err_fd = _fileno(sys.stderr)
    if err_fd is not None:
        _send_stdout_to(err_fd)
    sys.stdout = sys.stderr
