"""How many CPU threads a job's training process should use.

torch's default intra-op pool has one thread per core of the *machine*. In a container limited by
a CFS quota, beside DataLoader worker processes that each want a core, that oversubscribes the CPU:
on a 2-core machine the digits job ran ~1.8× slower with torch's default than with one thread
(issue 9; ``bench/README.md``). The worker therefore picks the thread count itself:
``TORCH_THREADS`` if set, else the CPUs this process may use minus the DataLoader workers (at least 1).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by the cgroup's CFS quota (e.g. 2.5 for ``250000 100000``), or None if unlimited."""
    try:
        if _CGROUP_CPU_MAX.exists():
            quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists():
            quota = int(_CGROUP_V1_QUOTA.read_text())
            return None if quota <= 0 else quota / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, Kubernetes cpusets), capped by
    the cgroup CPU quota (Docker ``--cpus``, Kubernetes ``limits.cpu``) rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def training_threads(num_workers: int, configured: int = 0, processes: int = 1) -> int:
    """Intra-op threads of each training process of a job with ``num_workers`` DataLoader
    processes per training process.

    Args:
        num_workers: the spec's ``num_workers``; each such process is given a core of its own.
        configured: the ``TORCH_THREADS`` setting; 0 means choose.
        processes: training processes sharing the CPUs (``resources.gpus`` of a multi-GPU job).

    Returns:
        ``configured`` when positive, else ``max(1, (usable_cpus() - processes * num_workers) // processes)``.
    """
    if configured > 0:
        return configured
    return max(1, (usable_cpus() - processes * num_workers) // processes)
