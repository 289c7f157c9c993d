"""Peak memory of one process, for benchmarks that run each method in its own subprocess.

CPU: the peak resident set (Linux ``VmHWM``), reset at :meth:`PeakMemory.start` by writing 5 to
``/proc/self/clear_refs`` (falls back to ``ru_maxrss`` where that is not allowed), minus the
resident set at the start. Start the process with :data:`MALLOC_ENV` so that glibc serves every
allocation of 64 KiB or more with its own mmap and returns it on free: the resident set then
follows the live tensors instead of heap fragmentation. CUDA: ``torch.cuda.max_memory_allocated``
minus what was allocated at the start.
"""
from __future__ import annotations

import os
import resource

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


class PeakMemory:
    """``start()`` before the model is built, ``peak()`` after the work: bytes above the start."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = 0
        self.reset_ok = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.base = rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm = _status_kib("VmHWM") if self.reset_ok else None
        peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base)
