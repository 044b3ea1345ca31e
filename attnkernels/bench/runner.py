"""Runs the cases: check each backend against torch, then time it; one Record per measurement."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import timing
from .cases import Case, PreparedCase, Unsupported, first_line


@dataclass
class Record:
    """One measurement (or the reason there is none)."""

    op: str
    direction: str
    size: int
    shape: str
    dtype: str
    device: str
    backend: str
    status: str  # ok | WRONG | unsupported | oom | error
    detail: str
    time_s: float | None = None
    fastest_s: float | None = None  # the fastest call's time: its rate is compared with the limit
    repetitions: int | None = None
    method: str | None = None
    speedup: float | None = None  # torch's time / this time
    work: float = 0.0  # bytes moved or FLOPs of one call
    work_unit: str = ""
    rate: float | None = None  # work per second
    limit: float | None = None  # the machine's measured limit in the same unit
    fraction_of_limit: float | None = None
    max_error: float | None = None
    allowed_error: float | None = None
    input_copies: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class MachineLimits:
    copy_bytes_per_s: float
    matmul_flop_per_s: dict[str, float]  # per dtype name

    def for_case(self, case: Case) -> float | None:
        """The case's limit: copy bandwidth for sampling; for attention the matmul rate in its dtype or,
        for 16-bit dtypes, float32's where that is higher (a CPU without float16 matrix instructions runs
        torch's float16 matmul at a few GFLOP/s, while a kernel may compute in float32)."""
        return self.for_work(case.spec.work_unit, case.dtype_name)

    def for_work(self, work_unit: str, dtype_name: str) -> float | None:
        if work_unit == "B":
            return self.copy_bytes_per_s
        own = self.matmul_flop_per_s.get(dtype_name)
        if dtype_name in ("float16", "bfloat16") and own is not None:
            return max(own, self.matmul_flop_per_s.get("float32", 0.0))
        return own

    def best_of(self, other: MachineLimits) -> MachineLimits:
        """The higher of two probes of each limit (a limit is what the machine reaches at best)."""
        rates = {name: max(rate, other.matmul_flop_per_s.get(name, 0.0))
                 for name, rate in self.matmul_flop_per_s.items()}
        return MachineLimits(max(self.copy_bytes_per_s, other.copy_bytes_per_s), rates)


def apply_limits(records: Sequence[Record], limits: MachineLimits) -> None:
    """Sets each timed record's limit and fraction of it (timing.fraction_of_limit) from ``limits``."""
    for record in records:
        limit = limits.for_work(record.work_unit, record.dtype)
        if record.rate is not None and limit:
            record.limit = limit
            record.fraction_of_limit = timing.fraction_of_limit(record.work, record.fastest_s, record.rate, limit)


def measure_limits(device: torch.device, cases: Sequence[Case], budget: timing.TimingBudget,
                   small: bool = False) -> MachineLimits:
    """Copy bandwidth, and matrix throughput in each dtype that a FLOP-counted case uses (and in
    float32 with 16-bit ones, their limit where it is higher)."""
    dtypes = {case.dtype for case in cases if case.spec.work_unit == "FLOP"}
    if dtypes & {torch.float16, torch.bfloat16}:
        dtypes.add(torch.float32)
    dtypes = sorted(dtypes, key=str)
    return MachineLimits(
        copy_bytes_per_s=timing.copy_bandwidth(device, budget, small),
        matmul_flop_per_s={str(d).removeprefix("torch."): timing.matmul_throughput(device, d, budget, small)
                           for d in dtypes},
    )


class Progress:
    """tqdm on stderr where installed, else a plain bar."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)

    def step(self, description: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(description, refresh=False)
            self._bar.update(1)
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {description[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check(prepared: PreparedCase, record: Record) -> bool:
    """Check ``record.backend`` against torch (torch: compute the reference); whether to time it."""
    if record.backend == "torch":
        expected = prepared.expected()
        if expected.torch_fails is not None:
            raise Unsupported(f"torch not run: {expected.torch_fails}")
        record.max_error = max(expected.torch_error, default=0.0)
        record.detail = "baseline"
        return True
    check = prepared.check(record.backend)
    record.max_error, record.allowed_error, record.detail = check.max_error, check.allowed, check.detail
    if not check.ok:
        record.status = "WRONG"  # reported, never timed
    return check.ok


def _guarded(record: Record, device: torch.device, step, *args) -> bool:
    """Run ``step(*args)``, turning its failure into the record's status; whether it succeeded."""
    try:
        return bool(step(*args))
    except Unsupported as reason:
        record.status, record.detail = "unsupported", str(reason)
    except torch.OutOfMemoryError as error:
        record.status, record.detail = "oom", first_line(error)
    except Exception as error:  # a crashing kernel is reported, and the run goes on
        record.status, record.detail = "error", first_line(error)
    if record.status == "oom":
        _free(device)  # outside the handler, whose traceback holds the failed call's tensors
    return False


def _store(record: Record, result: timing.Timing) -> bool:
    record.time_s, record.repetitions, record.method = result.seconds, result.repetitions, result.method
    record.fastest_s = result.fastest
    record.status = "ok"
    return True


def _time_alone(prepared: PreparedCase, record: Record, budget: timing.TimingBudget) -> bool:
    return _store(record, timing.time_callable(prepared.timed_callable(record.backend), prepared.case.device, budget))


def run_case(case: Case, backends: Sequence[str], budget: timing.TimingBudget, limits: MachineLimits | None,
             progress: Progress | None = None) -> list[Record]:
    """torch and every backend on one case: check each against torch, then time the correct ones.

    On the CPU the backends are timed interleaved (a round of one call each, repeated), so that
    load from other processes falls on all of them alike; on the GPU one after the other."""
    records = [Record(case.op, case.direction, case.size, case.label, case.dtype_name, case.device.type, backend,
                      status="error", detail="", work=case.work, work_unit=case.spec.work_unit)
               for backend in ("torch", *backends)]
    prepared = None
    try:
        prepared = PreparedCase(case, copies=1)
        prepared.extend_to(timing.input_copies(prepared.input_bytes(), case.device))
    except torch.OutOfMemoryError as error:
        for record in records:
            record.status, record.detail = "oom", f"making the inputs: {first_line(error)}"
    if prepared is not None:
        to_time = []
        for record in records:
            record.input_copies = prepared.copies
            if _guarded(record, case.device, _check, prepared, record):
                to_time.append(record)
        if case.device.type == "cpu" and len(to_time) > 1:
            try:
                results = timing.time_interleaved({r.backend: prepared.timed_callable(r.backend) for r in to_time},
                                                  budget)
                for record in to_time:
                    _store(record, results[record.backend])
                to_time = []
            except Exception:  # some backend failed mid-run: time them one by one to say which
                pass
        for record in to_time:
            _guarded(record, case.device, _time_alone, prepared, record, budget)
    if progress is not None:
        for record in records:
            progress.step(f"{case.op} {case.direction} {case.size} {case.dtype_name} {record.backend}")
    del prepared
    _free(case.device)

    torch_time = records[0].time_s
    for record in records:
        if record.time_s is None:
            continue
        record.rate = record.work / record.time_s
        if torch_time is not None:
            record.speedup = torch_time / record.time_s
    if limits is not None:
        apply_limits(records, limits)
    return records


def run_cases(cases: Sequence[Case], backends: Sequence[str], budget: timing.TimingBudget,
              limits: MachineLimits | None, show_progress: bool = True) -> list[Record]:
    progress = Progress(len(cases) * (1 + len(backends)), enabled=show_progress)
    try:
        return [record for case in cases for record in run_case(case, backends, budget, limits, progress)]
    finally:
        progress.close()
