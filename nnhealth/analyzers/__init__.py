"""The registry of checks. Codes and names are a contract: stable, never reused."""

from __future__ import annotations

import importlib
import pkgutil

from nnhealth.analyzers.base import Check, Option


def _discover() -> tuple[type[Check], ...]:
    """Every check defined in a public module of this package, in code order: adding a
    check is adding its file. Two checks with one code or name are refused."""
    found: list[type[Check]] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Check)
            and obj.__module__ == module.__name__
        ]
    for attr in ("code", "name"):
        values = [getattr(c, attr) for c in found]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise TypeError(f"checks share a {attr}: {', '.join(twice)}")
    return tuple(sorted(found, key=lambda c: c.code))


REGISTRY: tuple[type[Check], ...] = _discover()

__all__ = ["REGISTRY", "Check", "Option", "lookup", "select_checks"]


def lookup(code_or_name: str) -> type[Check] | None:
    key = code_or_name.strip()
    for check in REGISTRY:
        if key.upper() == check.code or key.lower() == check.name:
            return check
    return None


def _matches(token: str) -> list[type[Check]]:
    token = token.strip()
    if not token:
        return []
    exact = lookup(token)
    if exact is not None:
        return [exact]
    if token.upper() == "ALL":
        return list(REGISTRY)
    # ruff-style prefixes: NH1 selects NH101, NH102
    prefix = [
        c for c in REGISTRY if token.upper().startswith("NH") and c.code.startswith(token.upper())
    ]
    if prefix:
        return prefix
    raise ValueError(
        f"unknown check {token!r}: use a code (NH101), a code prefix (NH1) or a name "
        "(dead-relu); `nnhealth checks` lists them"
    )


def select_checks(select: list[str] | None, ignore: list[str] | None) -> list[type[Check]]:
    """The checks to run, in registry order. Raises ValueError on an unknown token."""
    chosen = set(REGISTRY) if not select else {c for t in select for c in _matches(t)}
    for token in ignore or []:
        chosen -= set(_matches(token))
    return [c for c in REGISTRY if c in chosen]
