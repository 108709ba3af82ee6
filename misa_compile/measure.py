"""Timing and peak-memory measurement shared by the demo, the evaluation and the benchmarks.
CUDA: events and the caching allocator's peak counter. CPU: wall clock, and the peak of the
allocation timeline that torch's profiler records (every tensor allocation and free), which is
the extra memory an operation needed beyond what already existed."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Measurement:
    ms: float          # median time of one call
    peak_bytes: int    # extra memory at the high-water mark of one call


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 3,
            warmup: bool = True) -> Measurement:
    """Runs `fn` once to warm up (unless the caller just did), then times `repeats` calls and
    measures one call's peak memory."""
    if warmup:
        fn()
    if device.type == "cuda":
        return _measure_cuda(fn, repeats)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Measurement(ms=sorted(times)[len(times) // 2], peak_bytes=cpu_peak_bytes(fn))


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                            profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native library writes a start/stop line to file descriptor 2 on every use;
    Python-level errors still propagate as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _measure_cuda(fn: Callable[[], object], repeats: int) -> Measurement:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    return Measurement(ms=sorted(times)[len(times) // 2], peak_bytes=peak)


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
