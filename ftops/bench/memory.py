"""Peak-memory measurement: one place for how memory is counted, used by the main job
(``python -m ftops.bench``, one method per subprocess) and by the microbenchmarks in ``bench/``.

CPU: the process's resident set from ``/proc/self/status`` (Linux). ``VmRSS`` is what is resident
now, ``VmHWM`` its high-water mark; writing ``5`` to ``/proc/self/clear_refs`` resets the mark to
the current RSS (Linux >= 4.0), so a peak can be taken over a window (after warm-up). Before a
reset, freed heap memory that glibc still holds is handed back with ``malloc_trim(0)``, so that
the baseline is live memory, not the allocator's cache. A process started with
:data:`MALLOC_ENV` has glibc serve every allocation of 64 KiB or more with its own mmap and return
it on free, so the resident set follows the live tensors instead of heap fragmentation.
Elsewhere (no ``/proc``): ``ru_maxrss``, the lifetime peak.
CUDA: ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` (tensor memory through the
caching allocator; ``reset_peak_memory_stats`` starts a window).

Usage::

    meter = PeakMeter(device)     # "cpu" / "cuda" / torch.device
    base = meter.reset()          # bytes in use now; the peak window starts here
    ...                           # the measured work
    extra = meter.peak() - base   # peak bytes above the baseline
    meter.hwm_reset               # False on CPU when the high-water mark could not be reset
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from typing import Optional

__all__ = ["MALLOC_ENV", "PeakMeter", "proc_status_kb", "rss_bytes", "malloc_trim"]

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...); without ``/proc``,
    the lifetime peak ``ru_maxrss`` stands in for both."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    return proc_status_kb("VmRSS") * 1024


_libc: Optional[ctypes.CDLL] = None


def malloc_trim() -> bool:
    """glibc ``malloc_trim(0)``: return freed heap memory to the system. False where unavailable."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(_libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return proc_status_kb("VmHWM") <= proc_status_kb("VmRSS") + 64


class PeakMeter:
    """Current and peak memory of this process on one device (see the module docstring)."""

    def __init__(self, device="cpu"):
        import torch  # imported here so that importing this module stays cheap

        self._torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.hwm_reset = True

    def sync(self) -> None:
        if self.cuda:
            self._torch.cuda.synchronize(self.device)

    def current(self) -> int:
        """Bytes in use now (CUDA: allocated tensor memory; CPU: RSS)."""
        self.sync()
        return self._torch.cuda.memory_allocated(self.device) if self.cuda else rss_bytes()

    def reset(self) -> int:
        """Start a peak window (garbage collected, allocator caches released first); returns
        the bytes in use at its start. On CPU, ``hwm_reset`` says whether the high-water mark
        could be reset (if not, :meth:`peak` is the process-lifetime peak)."""
        gc.collect()
        self.sync()
        if self.cuda:
            self._torch.cuda.reset_peak_memory_stats(self.device)
            return self._torch.cuda.memory_allocated(self.device)
        malloc_trim()
        self.hwm_reset = _reset_hwm()
        return rss_bytes()

    def peak(self) -> int:
        """Peak bytes in use since the last :meth:`reset` (or since the start)."""
        self.sync()
        if self.cuda:
            return self._torch.cuda.max_memory_allocated(self.device)
        return proc_status_kb("VmHWM") * 1024
