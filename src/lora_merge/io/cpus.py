"""How many CPUs this process may really use: the default of ``--threads``.

``os.cpu_count()`` counts the machine's cores, not this process's share of them.
A Slurm job, ``taskset`` or a container's cpuset narrows the CPUs the process may
run on (its affinity mask), and a container's CPU quota (cgroup ``cpu.max``, or
``cpu.cfs_quota_us`` under cgroup v1) caps the CPU time it gets whatever its
affinity: 64 threads on a 4-CPU quota are throttled, each holding its tile
buffers and factors for nothing. The count is the smaller of the two.

The paths are parameters, so that tests can hand in a cgroup file tree of their own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from pathlib import Path

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpu_count(
    affinity: Collection[int] | None = None,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    cgroup_root: Path = CGROUP_ROOT,
) -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota.

    Args:
        affinity: the CPUs the process may run on; None asks the OS
            (``os.sched_getaffinity`` where it exists, else the machine's count).
        proc_self_cgroup: the file naming this process's cgroups (``/proc/self/cgroup``).
        cgroup_root: where the cgroup file systems are mounted (``/sys/fs/cgroup``).

    Returns:
        At least 1. A fractional quota (1.5 CPUs) counts as the next whole number:
        the last thread still gets half a CPU's time.
    """
    count = len(affinity) if affinity is not None else _affinity_count()
    quota = cgroup_cpu_quota(proc_self_cgroup, cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc_self_cgroup: Path, cgroup_root: Path) -> float | None:
    """The CPU time this process's cgroups allow, in CPUs (quota / period); None without a quota.

    The tightest quota wins, of the process's own cgroup and every cgroup above it
    (a limit set on a parent holds for its children). cgroup v2 (``0::/path``) reads
    ``cpu.max``; cgroup v1 reads ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the
    ``cpu`` controller's hierarchy. Inside a container the process's path may not
    exist under the mount (the container sees its own cgroup as the root), so the
    ancestors that exist are read. Files missing or unreadable mean no quota: on
    macOS and Windows there is no ``/proc``.
    """
    try:
        lines = proc_self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2, one unified hierarchy
            quotas += _quotas_up_the_tree(cgroup_root, path, _cpu_max)
        elif "cpu" in controllers.split(","):  # cgroup v1: mounted as cpu or cpu,cpuacct
            for mount in (cgroup_root / controllers, cgroup_root / "cpu"):
                if mount.is_dir():
                    quotas += _quotas_up_the_tree(mount, path, _cfs_quota)
                    break
    return min(quotas, default=None)


def _quotas_up_the_tree(
    mount: Path, path: str, read_quota: Callable[[Path], float | None]
) -> list[float]:
    """The quotas of the cgroup at ``path`` under ``mount`` and of each cgroup above it."""
    folder = mount.joinpath(*[part for part in path.split("/") if part not in ("", ".", "..")])
    quotas = []
    while True:
        quota = read_quota(folder)
        if quota is not None:
            quotas.append(quota)
        if folder == mount or mount not in folder.parents:
            return quotas
        folder = folder.parent


def _cpu_max(folder: Path) -> float | None:
    """cgroup v2's ``cpu.max``: ``"$QUOTA $PERIOD"`` in microseconds, or ``"max $PERIOD"``."""
    fields = _read_fields(folder / "cpu.max")
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _cfs_quota(folder: Path) -> float | None:
    """cgroup v1's ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us``."""
    quota = _read_fields(folder / "cpu.cfs_quota_us")
    period = _read_fields(folder / "cpu.cfs_period_us")
    if len(quota) != 1 or len(period) != 1:
        return None
    return _ratio(quota[0], period[0])


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # -1 is "no limit" in cgroup v1
        return None
    return quota_us / period_us


def _read_fields(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split()
    except OSError:
        return []


def _affinity_count() -> int:
    """The CPUs the OS lets this process run on (the machine's count where it cannot say)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
