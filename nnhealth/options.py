"""The scan's options, each declared once in ``OPTIONS``: name, kind (type, reading from
text, validation), default, help, config key, NNHEALTH_* variable, command-line spelling
and scope.

From it: ``ScanOptions`` (the library's share), the parameters of ``nnhealth scan``
(cli.py), the config keys and environment variables with their coercion (config.py),
the refusals of bad values (one wording whether a value came from a flag, a file, a
variable or the Python API) and the CLI spelling of each option for messages.

No torch and no typer here: the library and ``nnhealth --help`` both read this module.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nnhealth.errors import UsageError, flag
from nnhealth.findings import Severity


class Loss(enum.StrEnum):  # loading.loss.NAMES holds what each computes
    auto = "auto"
    ce = "ce"
    mse = "mse"
    bce = "bce"


class Mode(enum.StrEnum):
    train = "train"
    eval = "eval"


class Format(enum.StrEnum):  # formatters.FORMATTERS maps each to its class
    text = "text"
    json = "json"
    sarif = "sarif"
    github = "github"
    junit = "junit"
    markdown = "markdown"
    html = "html"


class ReportFormat(enum.StrEnum):  # nnhealth report: a training history's formats
    text = "text"
    json = "json"
    html = "html"


# the exit-code threshold: Severity's labels, most severe first
Level = enum.StrEnum("Level", [(s.label, s.label) for s in sorted(Severity, reverse=True)])
# nnhealth report's threshold: a severity, or never (exit 0 whatever the verdicts)
ReportLevel = enum.StrEnum(
    "ReportLevel", [*((v.value, v.value) for v in Level), ("never", "never")]
)


class OptimizerKind(enum.StrEnum):  # optim.KINDS: what each limit and step is
    sgd = "sgd"
    momentum = "momentum"
    nesterov = "nesterov"
    adam = "adam"
    adamw = "adamw"
    rmsprop = "rmsprop"
    lars = "lars"
    lamb = "lamb"


class Device(enum.StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Scope(enum.StrEnum):
    SCAN = "scan"  # a ScanOptions field: the runner reads it
    PIPELINE = "pipeline"  # what-if and baseline: keywords of pipeline.run
    CLI = "cli"  # loading from paths, rendering, exit: the command line only


class Role(enum.StrEnum):
    """What a path option names, for the rules of a config file."""

    READ = "read"  # a file to read (relative to the config file)
    CODE = "code"  # a file to read or an entry point to import (a file needs trust)
    WRITE = "write"  # a file nnhealth writes (from a file: only inside its tree)


MAX_SEED = 2**63 - 1  # torch generators take 64 bits; room for the small offsets added
# Hessian-vector products one option may ask for: each costs about two passes, so this
# is days on any model worth scanning; beyond it a typo, not a plan
MAX_PRODUCTS = 100_000
MAX_EXAMPLES = 2**31 - 1  # a sub-batch's size: beyond the batch it is refused anyway
NO_CHECK = (
    "names no check (an empty list); leave it out for the default checks, or give codes, "
    "prefixes or names (NH101, NH1, dead-relu)"
)


# ---- kinds: how a value is typed, read from text and checked ------------------------


class Kind:
    """A kind of value; ``annotation`` is the type the command line parses into."""

    annotation: Any = str

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (``expected ...``), or None."""
        if not isinstance(value, (str, os.PathLike)):
            return "expected a string"
        return None if str(value) != "" else "expected a non-empty string"

    def parse(self, text: str) -> Any:
        """An environment variable's text as a value (ValueError: not one)."""
        return text

    def coerce(self, value: Any) -> Any:
        """A value (a flag's, a file's, a parsed variable's) in the form the scan uses."""
        return value

    def refusal(self, where: str, value: Any, problem: str, placed: bool) -> str:
        """``placed``: ``where`` is a file's key or a variable (the value follows)."""
        return f"{where}: {problem}, got {value!r}" if placed else f"{where} {value!r}: {problem}"


class Text(Kind):
    """A non-empty string."""


class File(Kind):
    """A path: a string in files and variables, a Path on the command line."""

    annotation = Path


class Flag(Kind):
    annotation = bool
    TRUE = frozenset({"1", "true", "yes", "on"})
    FALSE = frozenset({"0", "false", "no", "off", ""})

    def problem(self, value: Any) -> str | None:
        return None if isinstance(self.coerce(value), bool) else "expected true or false"

    def coerce(self, value: Any) -> Any:
        # 0 and 1 too: Python callers write what_if=1 as often as what_if=True
        return bool(value) if _is_int(value) and value in (0, 1) else value

    def parse(self, text: str) -> Any:
        word = text.strip().lower()
        if word not in self.TRUE | self.FALSE:
            raise ValueError(text)
        return word in self.TRUE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Integer(Kind):
    low: int
    high: int = MAX_PRODUCTS
    high_text: str = ""  # how to write ``high`` (default: with thousands separators)
    annotation = int

    def problem(self, value: Any) -> str | None:
        if _is_int(value) and self.low <= value <= self.high:
            return None
        return f"expected an integer in [{self.low}, {self.high_text or f'{self.high:,}'}]"

    def parse(self, text: str) -> Any:
        return int(text.strip())


@dataclass(frozen=True)
class Number(Kind):
    low: float = 0.0
    high: float | None = None  # exclusive
    closed: bool = False  # ``low`` itself allowed
    annotation = float

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        above = value >= self.low if self.closed else value > self.low
        if math.isfinite(value) and above and (self.high is None or value < self.high):
            return None
        if self.high is not None:
            return f"expected a number in ({self.low:g}, {self.high:g})"
        return f"expected a finite number {'>=' if self.closed else '>'} {self.low:g}"

    def parse(self, text: str) -> Any:
        return float(text.strip())

    def coerce(self, value: Any) -> Any:
        return float(value) if _is_int(value) else value


@dataclass(frozen=True)
class Choice(Kind):
    choices: type[enum.StrEnum]

    @property
    def annotation(self) -> Any:
        return self.choices

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in {c.value for c in self.choices}:
            return None
        return "expected one of " + ", ".join(c.value for c in self.choices)

    def coerce(self, value: Any) -> Any:
        return value.value if isinstance(value, enum.Enum) else value


class Codes(Kind):
    """Check codes, prefixes or names: a list, or one comma-separated string."""

    annotation = list[str]

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return "expected a list of check codes or names"
        return None if any(v.strip() for v in value) else NO_CHECK

    def parse(self, text: str) -> Any:
        return self.coerce(text)

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [t.strip() for v in value for t in v.split(",") if t.strip()]
        return value

    def refusal(self, where: str, value: Any, problem: str, placed: bool) -> str:
        if problem == NO_CHECK:
            return f"{where}: {problem}" if placed else f"{where} {problem}"
        return super().refusal(where, value, problem, placed)


class Betas(Kind):
    """Adam's (beta1, beta2): two numbers in [0, 1), as "0.9,0.999" or a pair."""

    def problem(self, value: Any) -> str | None:
        ok = (
            isinstance(value, tuple)
            and len(value) == 2
            and all(isinstance(b, float) and 0.0 <= b < 1.0 for b in value)
        )
        return None if ok else "expected two numbers in [0, 1) such as 0.9,0.999"

    def coerce(self, value: Any) -> Any:
        pair = value.replace(" ", "").split(",") if isinstance(value, str) else value
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            try:
                return tuple(float(v) for v in pair)
            except (TypeError, ValueError):
                return value
        return value  # refused as given


# ---- the options ---------------------------------------------------------------------

_FROM_NAME = ""  # key/env not given: derived from the option's name


@dataclass(frozen=True)
class Option:
    name: str  # keyword, ScanOptions field and scan parameter
    kind: Kind
    default: Any
    help: str
    scope: Scope = Scope.CLI
    flags: tuple[str, ...] = ()  # command-line spellings; () : --name-with-dashes
    key: str | None = _FROM_NAME  # config key; None: not in config files
    env: str | None = _FROM_NAME  # NNHEALTH_*; None: no variable
    role: Role | None = None
    argument: bool = False  # positional on the command line
    # its variable is read by the command-line parser, before the config file (whose
    # rules depend on it: whether code may run); config.resolve reads the others
    early: bool = False
    show_default: bool = True

    def __post_init__(self) -> None:
        dashed = self.name.replace("_", "-")
        if not self.flags and not self.argument:
            object.__setattr__(self, "flags", (f"--{dashed}",))
        if self.key == _FROM_NAME:
            object.__setattr__(self, "key", dashed)
        if self.env == _FROM_NAME:
            word = self.key or dashed
            object.__setattr__(self, "env", "NNHEALTH_" + word.upper().replace("-", "_"))

    @property
    def annotation(self) -> Any:
        """The Python type the command line parses into (optional when the default is None)."""
        base = self.kind.annotation
        return base | None if self.default is None else base

    @property
    def spellings(self) -> dict[str, str]:
        """How the command line names this option (and its --no- form) in messages."""
        if self.argument:
            return {self.name: self.name.upper()}
        first = self.flags[0].split("/")
        out = {self.name: first[0]}
        if len(first) > 1:
            out["no_" + self.name] = first[1]
        return out

    def refuse(self, value: Any) -> None:
        """Raise UsageError unless ``value`` fits (a keyword or flag value)."""
        if value is None and self.default is None:
            return
        problem = self.kind.problem(value)
        if problem is not None:
            raise UsageError(self.kind.refusal(flag(self.name), value, problem, placed=False))

    def read(self, value: Any, where: str, *, text: bool) -> Any:
        """A config file's value (``text``: a variable's) for this option, checked;
        ``where`` names the file's key or the variable in the refusal."""
        given = value
        try:
            value = self.kind.coerce(self.kind.parse(value) if text else value)
        except ValueError:
            pass  # the text itself is refused below, as the kind words it
        problem = self.kind.problem(value)
        if problem is not None:
            raise UsageError(self.kind.refusal(where, given, problem, placed=True))
        return value


_CODES = "codes, code prefixes or names"
OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        Text(),
        None,
        "Model file (torch.save, TorchScript, state_dict, safetensors) or entry point "
        "pkg.module:factory / file.py:factory. Default: model in the config file.",
        argument=True,
        role=Role.CODE,
        show_default=False,
    ),
    Option(
        "data",
        Text(),
        None,
        "Batch file: .pt (tensor, (inputs, targets) or dict), .npz or .npy.",
        role=Role.READ,
    ),
    Option(
        "input_shape", Text(), None, "Synthetic unit-Gaussian batch of this shape, e.g. 64x3x32x32."
    ),
    Option(
        "weights",
        Text(),
        None,
        "state_dict / Lightning .ckpt / safetensors to load into an entry point's model.",
        role=Role.READ,
    ),
    Option(
        "arch",
        Text(),
        None,
        "Entry point pkg.module:factory building the architecture for a state_dict MODEL.",
        role=Role.CODE,
    ),
    Option(
        "lr",
        Number(),
        None,
        "Learning rate: judged against the optimizer's stability limit (NH401) and the "
        "update size of each layer (NH301). Default: the saved optimizer's (after its scheduler).",
        Scope.SCAN,
    ),
    Option(
        "optimizer",
        Choice(choices=OptimizerKind),
        None,
        "The optimizer whose limits NH401 and NH301 judge the lr by. Default: the one saved "
        "with the model (checkpoint, --optimizer-state), else sgd (sgd with --momentum).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "momentum",
        Number(0.0, 1.0, closed=True),
        None,
        "Momentum of sgd/momentum/nesterov/rmsprop/lars (default: saved, else 0.9 for "
        "momentum, nesterov and lars).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "betas",
        Betas(),
        None,
        "Adam/AdamW/LAMB betas as B1,B2 (default: saved, else 0.9,0.999).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "eps",
        Number(),
        None,
        "Epsilon of adam/adamw/rmsprop/lamb (default: saved, else 1e-8; lamb 1e-6).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "weight_decay",
        Number(closed=True),
        None,
        "Weight decay (default: saved, else 0).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "optimizer_state",
        Text(),
        None,
        "Optimizer state to judge by: a saved optimizer.state_dict(), a checkpoint holding "
        "one, or a Hugging Face Trainer checkpoint folder. Read with weights_only=True.",
        role=Role.READ,
    ),
    Option(
        "hessian",
        Flag(),
        None,  # None: measure curvature iff NH401 was selected explicitly
        "Measure the Hessian's top eigenvalue by Lanczos (NH401). Default: only when NH401 "
        "is selected with --select.",
        Scope.SCAN,
        flags=("--hessian/--no-hessian",),
        show_default=False,
    ),
    Option("hessian_top", Integer(1), 1, "How many top eigenvalues.", Scope.SCAN),
    Option(
        "hessian_min",
        Flag(),
        False,
        "Also the smallest eigenvalue (negative curvature).",
        Scope.SCAN,
    ),
    Option(
        "hessian_trace",
        Integer(0),
        0,
        "Hutchinson probes for the Hessian trace (0: none).",
        Scope.SCAN,
    ),
    Option(
        "hessian_tol",
        Number(0.0, 1.0),
        1e-2,
        "Relative error bound at which Lanczos stops (1e-2: the lr limit needs lambda_max "
        "to about 1%; the true error is usually far smaller).",
        Scope.SCAN,
    ),
    Option(
        "hessian_budget",
        Integer(1),
        100,
        "Most Hessian-vector products Lanczos may take.",
        Scope.SCAN,
    ),
    Option(
        "hessian_batch",
        Integer(1, MAX_EXAMPLES, "2**31 - 1"),
        None,
        "Measure the Hessian on the batch's first N examples (the sharpness of a sub-batch); "
        "with --hessian-batches K, the size of each sub-batch. Default: the whole batch "
        "(batch // K with K sub-batches).",
        Scope.SCAN,
        show_default=False,
    ),
    Option(
        "hessian_batches",
        Integer(1),
        1,
        "Lanczos on K disjoint sub-batches of the batch: lambda_max is their mean, with its "
        "spread (std, min, max); the lr limit is judged from the mean.",
        Scope.SCAN,
    ),
    Option(
        "loss",
        Choice(choices=Loss),
        Loss.auto,
        "Loss: auto picks cross-entropy for class targets, MSE for float targets.",
        Scope.SCAN,
    ),
    Option(
        "mode",
        Choice(choices=Mode),
        Mode.train,
        "Run the pass in train mode (dropout, batch statistics) or eval mode.",
        Scope.SCAN,
    ),
    Option("select", Codes(), None, f"Checks to run: {_CODES}, comma-separated.", Scope.SCAN),
    Option("ignore", Codes(), None, "Checks to skip: codes, prefixes or names.", Scope.SCAN),
    Option(
        "fmt",
        Choice(choices=Format),
        Format.text,
        "Report format.",
        flags=("--format",),
        key="format",
    ),
    Option(
        "output",
        File(),
        None,
        "Write the report to this file instead of stdout.",
        flags=("--output", "-o"),
        role=Role.WRITE,
    ),
    Option(
        "fail_on",
        Choice(choices=Level),
        Level.error,
        "Exit 1 when a finding is at or above this severity.",
    ),
    Option(
        "exit_zero", Flag(), False, "Exit 0 even with findings (errors of the tool still exit 2)."
    ),
    Option(
        "baseline",
        File(),
        None,
        "Fail only on findings that are new or worse than in this baseline file.",
        Scope.PIPELINE,
        role=Role.READ,
    ),
    Option(
        "write_baseline",
        File(),
        None,
        "Record the current findings as accepted (exit 0) in this file.",
        role=Role.WRITE,
    ),
    Option(
        "baseline_tolerance",
        Number(closed=True),
        0.1,
        "Relative growth of a finding's score that counts as worse.",
        Scope.PIPELINE,
    ),
    Option(
        "what_if",
        Flag(),
        False,
        "Re-scan a copy of the model with each recommended fix applied; report before/after.",
        Scope.PIPELINE,
    ),
    Option(
        "what_if_budget",
        Number(closed=True),
        120.0,
        "Seconds the --what-if fixes may take in all.",
        Scope.PIPELINE,
    ),
    Option(
        "trust",
        Flag(),
        False,
        "Allow what runs code from a file: unpickling classes outside torch.nn, TorchScript, "
        "a config file's entry points.",
        key=None,
        env="NNHEALTH_TRUST",
        early=True,
    ),
    Option(
        "device",
        Choice(choices=Device),
        None,
        "Device for the pass (default: where the model's parameters are).",
        Scope.SCAN,
    ),
    Option(
        "seed",
        Integer(0, MAX_SEED, "2**63 - 1"),
        0,
        "Seed for synthetic inputs, random targets and dropout.",
        Scope.SCAN,
    ),
    Option("quiet", Flag(), False, "Findings and verdict only.", flags=("--quiet", "-q")),
    Option(
        "verbose",
        Flag(),
        False,
        "Add each finding's evidence and the table columns that do not fit the terminal.",
        flags=("--verbose", "-v"),
    ),
    Option(
        "debug",
        Flag(),
        False,
        "Show tracebacks for errors.",
        key=None,
        env="NNHEALTH_DEBUG",  # read by cli.main, before the arguments are parsed
    ),
    Option(
        "config",
        File(),
        None,
        "Config file (pyproject.toml with [tool.nnhealth], or nnhealth.toml). Default: the "
        "nearest one from the current directory up.",
        key=None,
        env=None,
    ),
)

BY_NAME: Mapping[str, Option] = MappingProxyType({o.name: o for o in OPTIONS})
# config file key -> option
KEYS: Mapping[str, Option] = MappingProxyType({o.key: o for o in OPTIONS if o.key})
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {o.name: o.default.value if isinstance(o.default, enum.Enum) else o.default for o in OPTIONS}
)
# option name -> how the command line spells it (for NnhealthError.render); a config
# key written with underscores (format) names its option too
FLAGS: Mapping[str, str] = MappingProxyType(
    {
        **{o.key.replace("-", "_"): o.spellings[o.name] for o in OPTIONS if o.key},
        **{name: text for o in OPTIONS for name, text in o.spellings.items()},
    }
)
# pairs of options that exclude each other, with the refusal
EXCLUSIVE: tuple[tuple[str, str, str], ...] = (
    ("data", "input_shape", f"give either {flag('data')} or {flag('input_shape')}, not both"),
    (
        "arch",
        "weights",
        (
            f"give either {flag('arch')} ({flag('model')} is the weights) or "
            f"{flag('weights')}, not both"
        ),
    ),
)

ScanOptions = make_dataclass(
    "ScanOptions",
    [
        *((o.name, Any, field(default=DEFAULTS[o.name])) for o in OPTIONS if o.scope == Scope.SCAN),
        # from the config file's tables
        ("check_options", dict[str, dict[str, Any]], field(default_factory=dict)),
        ("severities", dict[str, Severity], field(default_factory=dict)),  # per check code
        ("layer_ignores", list[tuple[str, frozenset[str]]], field(default_factory=list)),
    ],
    namespace={
        "__module__": __name__,
        "__doc__": "What the runner needs to know: the scan-scope options of OPTIONS, and "
        "the per-check options, severities and per-layer ignores of the config file.",
    },
)


def check_values(values: Mapping[str, Any]) -> None:
    """Refuse a bad value among ``values`` (option name -> value), and options given
    together that exclude each other (UsageError naming the option)."""
    for name, value in values.items():
        BY_NAME[name].refuse(value)
    for first, second, message in EXCLUSIVE:
        if values.get(first) and values.get(second):
            raise UsageError(message)


def validate(opts: Any) -> None:
    """Refuse ``ScanOptions`` values the way the command line, the config file and
    NNHEALTH_* refuse them (one line, UsageError)."""
    check_values({o.name: getattr(opts, o.name) for o in OPTIONS if o.scope == Scope.SCAN})


def scan_options(values: Mapping[str, Any], **tables: Any) -> Any:
    """ScanOptions from ``values`` (option name -> value; the others are left out)
    and the config file's ``check_options``, ``severities`` and ``layer_ignores``."""
    scan = {o.name: values[o.name] for o in OPTIONS if o.scope == Scope.SCAN and o.name in values}
    return ScanOptions(**scan, **tables)


def in_scope(values: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    """The entries of ``values`` whose option is in ``scope``."""
    return {k: v for k, v in values.items() if k in BY_NAME and BY_NAME[k].scope == scope}
