"""Peak memory, measured one way for every benchmark: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
resident set size (RSS) and its kernel high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``),
with an RSS sampler thread where the mark cannot be reset (tracemalloc cannot see torch's allocations).
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import torch

__all__ = ["PeakMemory", "return_freed_memory", "rss", "hwm", "reset_hwm", "reset_peak", "peak_gib"]


class PeakMemory:
    """Peak memory above the starting point while the block runs (bytes), and how it was measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.how = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated above the allocation before prefill"
            return self
        mmap = " (glibc mmap threshold 64 KiB)" if return_freed_memory() else ""
        self.start = rss()
        if reset_hwm():
            self.how = "CPU peak RSS above the RSS before prefill (kernel VmHWM, reset via /proc/self/clear_refs)" + mmap
            self._sampler = None
        else:
            self.how = "CPU peak RSS above the RSS before prefill (sampled every 2 ms)" + mmap
            self._stop = threading.Event()
            self._max = self.start
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self._sampler is None:
            self.peak = hwm() - self.start
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._max, rss()) - self.start


def return_freed_memory() -> bool:
    """Make glibc serve allocations >= 64 KiB with mmap, so freed tensors leave the RSS (measurable peaks)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 65536))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def rss() -> int:
    try:
        return status_bytes("VmRSS")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def hwm() -> int:
    return status_bytes("VmHWM")


def reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return hwm() <= rss() + 64 * 1024
    except OSError:
        return False


def reset_peak(device: torch.device) -> None:
    """Start a CUDA peak-memory measurement afresh (freed cache blocks returned first); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """CUDA memory allocated at the peak since :func:`reset_peak`, GiB; ``None`` on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
