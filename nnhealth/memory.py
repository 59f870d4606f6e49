"""Free memory on this machine, as the tool's allocation checks and Lanczos see it: the
lesser of the system's MemAvailable and what the tightest cgroup limit leaves (a
container's limit is invisible to /proc/meminfo). No torch imported here (free_on takes
a torch.device and imports it only for CUDA)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = (_read_text(path) or "").strip()
    return int(text) if text.isdigit() else None  # "max", or no file: no limit here


def _inactive_file(stat: Path, key: str) -> int:
    """Reclaimable page cache in a cgroup's memory.stat (it counts as used, but is not)."""
    for line in (_read_text(stat) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


_CGROUP_FILES = {  # version: (subdirectory, limit, usage, reclaimable cache in memory.stat)
    "v2": ("", "memory.max", "memory.current", "inactive_file"),
    "v1": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def cgroup_free(
    root: Path = Path("/sys/fs/cgroup"), own: Path = Path("/proc/self/cgroup")
) -> int | None:
    """Bytes left under the tightest cgroup memory limit over this process's group and
    its ancestors (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), less usage net of
    reclaimable page cache; None when no limit is set. A container's limit is invisible
    to /proc/meminfo."""
    groups = {"v2": "/", "v1": "/"}
    for line in (_read_text(own) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[1] == "":
            groups["v2"] = fields[2]
        elif "memory" in fields[1].split(","):
            groups["v1"] = fields[2]
    free = []
    for version, (sub, limit_file, usage_file, cache_key) in _CGROUP_FILES.items():
        parts = [p for p in groups[version].split("/") if p and p not in (".", "..")]
        for depth in range(len(parts), -1, -1):  # the own group, then each ancestor
            directory = root.joinpath(sub, *parts[:depth])
            limit = _read_int(directory / limit_file)
            usage = _read_int(directory / usage_file)
            if limit is None or usage is None or limit >= 1 << 60:  # v1's "no limit"
                continue
            used = max(0, usage - _inactive_file(directory / "memory.stat", cache_key))
            free.append(max(0, limit - used))
    return min(free) if free else None


def available() -> int | None:
    """Bytes of memory this process may still allocate on the CPU (None: unknown)."""
    system = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    system = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if system is None:
        try:
            system = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            pass
    limited = cgroup_free()
    known = [m for m in (system, limited) if m is not None]
    return min(known) if known else None


def free_on(device: Any) -> int | None:
    """Bytes free on ``device`` (a torch.device; None: unknown): the GPU's free memory
    for CUDA, available() on the CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    return available()
