"""Timing and the machine's own limits (copy bandwidth, matrix throughput).

GPU: ``triton.testing.do_bench`` where Triton is installed (it synchronises,
flushes the L2 cache between repetitions and returns the median), else CUDA
events around each call. CPU: ``time.perf_counter`` around each call. Always a
warm-up first and the median of many repetitions.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TimingBudget:
    """How long to spend on one measurement."""

    warmup_s: float
    measure_s: float
    min_repetitions: int
    max_repetitions: int
    # Past this many seconds, slow calls (the reference backend) stop at 3 repetitions.
    patience_s: float = 4.0

    def more(self, repetitions: int, spent_s: float, wanted_s: float) -> bool:
        """Whether to time another repetition after ``repetitions`` taking ``spent_s`` in all."""
        if repetitions >= self.max_repetitions:
            return False
        if repetitions < min(3, self.min_repetitions):
            return True
        if repetitions < self.min_repetitions and spent_s < self.patience_s:
            return True
        return spent_s < wanted_s


FULL = TimingBudget(warmup_s=0.05, measure_s=0.4, min_repetitions=5, max_repetitions=500)
QUICK = TimingBudget(warmup_s=0.0, measure_s=0.02, min_repetitions=3, max_repetitions=20, patience_s=0.5)


@dataclass(frozen=True)
class Timing:
    seconds: float  # the median call's time, or the fastest's (time_callable's statistic)
    repetitions: int | None  # None where do_bench chose the count
    method: str
    fastest: float | None = None  # the fastest call's time, where the samples are known


def fraction_of_limit(work: float, fastest_s: float | None, median_rate: float, limit: float) -> float:
    """The fraction of ``limit`` (a probe's fastest call) that ``work`` reaches in its fastest call, or at
    its median rate where the fastest is not known: a median slowed by a busy neighbour would be compared
    with a best that it was not."""
    return (work / fastest_s if fastest_s else median_rate) / limit


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def time_callable(fn: Callable[[], object], device: torch.device, budget: TimingBudget = FULL,
                  statistic: str = "median") -> Timing:
    """The median time of one call of ``fn`` on ``device``, or with ``statistic="min"`` the fastest
    call's (the machine limits: what the machine reaches at best, which a noisy neighbour does not
    lower, while it does slow the medians compared with it)."""
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    if device.type == "cuda":
        if _has_triton():
            import triton.testing

            warmup, rep = max(1, int(budget.warmup_s * 1000)), max(1, int(budget.measure_s * 1000))
            try:
                milliseconds = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="all")
            except (ValueError, AssertionError):  # a Triton without return_mode="all": one statistic
                milliseconds = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode=statistic)
                return Timing(milliseconds / 1000.0, None, "triton.testing.do_bench")
            samples = [m / 1000.0 for m in milliseconds]
            return Timing(_summary(samples, statistic), len(samples), "triton.testing.do_bench", min(samples))
        return _time_cuda_events(fn, budget, statistic)
    return _time_wall_clock(fn, budget, statistic)


def _summary(samples: list[float], statistic: str) -> float:
    return min(samples) if statistic == "min" else statistics.median(samples)


def _time_wall_clock(fn: Callable[[], object], budget: TimingBudget, statistic: str = "median") -> Timing:
    fn()  # at least one warm-up call (allocator, lazy initialisation)
    start = time.perf_counter()
    while time.perf_counter() - start < budget.warmup_s:
        fn()
    samples: list[float] = []
    total = 0.0
    while budget.more(len(samples), total, budget.measure_s):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
        total += samples[-1]
    return Timing(_summary(samples, statistic), len(samples), "time.perf_counter", min(samples))


def time_interleaved(functions: Mapping[str, Callable[[], object]], budget: TimingBudget = FULL) -> dict[str, Timing]:
    """CPU: the median time of each function, timed in rounds of one call each (so that a burst of
    load from other processes slows all of them alike, not whichever ran at that moment)."""
    for fn in functions.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in functions}
    rounds, spent = 0, 0.0
    while budget.more(rounds, spent, budget.measure_s * len(functions)):
        for name, fn in functions.items():
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
            spent += samples[name][-1]
        rounds += 1
    return {name: Timing(statistics.median(values), rounds, "time.perf_counter, interleaved", min(values))
            for name, values in samples.items()}


def _time_cuda_events(fn: Callable[[], object], budget: TimingBudget, statistic: str = "median") -> Timing:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < budget.warmup_s:
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    total = 0.0
    while budget.more(len(samples), total, budget.measure_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1000.0)
        total += samples[-1]
    return Timing(_summary(samples, statistic), len(samples), "torch.cuda.Event", min(samples))


# ----------------------------------------------------------------------------- caches and input copies


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2, or the CPU's largest cache (32 MiB when the system does not say)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except ValueError:
            continue
    return max(sizes, default=32 << 20)


def input_copies(input_bytes: int, device: torch.device, memory_budget_bytes: int | None = None) -> int:
    """How many copies of a case's inputs to rotate through: enough that together they are
    three times the last-level cache (so a timed call finds its inputs cold), 2 to 8 copies,
    within the memory budget."""
    if memory_budget_bytes is None:
        if device.type == "cuda":
            memory_budget_bytes = torch.cuda.get_device_properties(device).total_memory // 5
        else:
            memory_budget_bytes = 2 << 30
    wanted = math.ceil(3 * last_level_cache_bytes(device) / max(input_bytes, 1))
    return max(1, min(8, max(2, wanted), memory_budget_bytes // max(input_bytes, 1)))


# ----------------------------------------------------------------------------- machine limits


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, budget: TimingBudget = FULL, small: bool = False) -> float:
    """Bytes per second of a large tensor copy, counting the read and the write (``small``: a
    quicker, rougher probe that still overflows the caches)."""
    megabytes = (256 if small else 1024) if device.type == "cuda" else (64 if small else 256)
    source = torch.ones(megabytes << 18, dtype=torch.float32, device=device)  # 4 bytes per element
    target = torch.empty_like(source)
    timing = time_callable(lambda: target.copy_(source), device, budget, statistic="min")
    return 2 * source.numel() * source.element_size() / timing.seconds


def matmul_throughput(device: torch.device, dtype: torch.dtype, budget: TimingBudget = FULL,
                      small: bool = False) -> float:
    """FLOP per second of a large square matrix product in ``dtype`` (``small``: a quicker probe)."""
    if device.type == "cuda":
        n = 4096 if small else 8192
    else:
        n = 2048 if dtype in (torch.float32, torch.float64) else 1024  # CPU half precision is slow
        n = n // 2 if small else n
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_callable(lambda: torch.mm(a, b), device, budget, statistic="min")
    return 2.0 * n**3 / timing.seconds
