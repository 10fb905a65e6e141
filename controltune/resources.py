"""The compute a run uses: torch's intra-op threads, and the peak memory it reached.

The sweep gives every cell its own thread budget (two torch processes with default threads on two cores run
several times slower each), and every run and sweep row reports its peak memory: the CUDA allocator's peak, or
on CPU the process's peak resident memory, reset per cell where Linux allows it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator

import torch


def default_threads() -> int:
    """Threads a run uses when not told: ``$OMP_NUM_THREADS`` if set to a positive integer, else every core
    this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) >= 1:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged); the old setting is restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """The ``field`` line of ``/proc/self/status`` in MB, or None where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float | None:
    """Peak resident memory since the last reset (``VmHWM``), or None where /proc is absent."""
    return _status_mb("VmHWM")


def rss_mb() -> float | None:
    """Resident memory now (``VmRSS``), or None where /proc is absent."""
    return _status_mb("VmRSS")
