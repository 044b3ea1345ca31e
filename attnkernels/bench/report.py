"""Reporting: the printed table, JSON and CSV of every measurement, PNG plots, bench/RESULTS.md."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import attnkernels
from attnkernels import _extension

from .cases import OPS
from .runner import MachineLimits, Record

COLUMNS = ("op", "pass", "shape", "dtype", "backend", "time", "vs torch", "rate", "of limit", "status")


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: machine, versions, date, command."""
    cpu = platform.processor() or platform.machine()
    vector_flags = []
    # A virtual machine's model name may say only the brand ("AMD EPYC"); family and model tell the
    # generation (AMD family 25: Zen 3 and Zen 4, 26: Zen 5).
    family_model = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                cpu = value
            elif key in ("cpu family", "model"):
                family_model[key] = value
            elif key == "flags":
                # The vector extensions that decide which CPU variant of the kernels can run.
                vector_flags = [f for f in value.split()
                                if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx"))]
            if not line.strip() and vector_flags:
                break  # the end of the first CPU's block
    except OSError:
        pass
    if len(family_model) == 2:
        cpu = f"{cpu}, family {family_model['cpu family']} model {family_model['model']}"

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_flags": " ".join(vector_flags) or None,
        "cpu_capability": attnkernels.cpu_capability(),
        "cpu_sampling_paths": _extension.cpu_sampling_paths(),
        # torch's own CPU kernels, and the libraries under its matmuls, can be capped too
        # (to measure an AVX2 machine's code paths on an AVX-512 one): say what they ran.
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {name: os.environ[name] for name in _ISA_CAP_VARIABLES if os.environ.get(name)},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "attnkernels": version("attnkernels"),
        "command": " ".join(["python -m attnkernels.bench", *sys.argv[1:]]),
        # Other processes' load skews CPU timings: say how busy the machine was.
        "load_average_at_start": _load_average(),
    }


_ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------- formatting


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def rate_unit(work_unit: str, device_type: str) -> tuple[str, float]:
    """The printed unit of a rate and its size: GB/s for bytes; TFLOP/s on GPU, GFLOP/s on CPU."""
    if work_unit == "B":
        return "GB/s", 1e9
    return ("TFLOP/s", 1e12) if device_type == "cuda" else ("GFLOP/s", 1e9)


def format_rate(record: Record) -> str:
    if record.rate is None:
        return "-"
    unit, scale = rate_unit(record.work_unit, record.device)
    return f"{record.rate / scale:.3g} {unit}"


def format_status(record: Record, width: int = 70) -> str:
    if record.status == "ok":
        return "ok"
    text = f"{record.status}: {record.detail}" if record.detail else record.status
    return text if len(text) <= width else text[:width - 3] + "..."


def table_rows(records: Sequence[Record]) -> list[tuple[str, ...]]:
    return [(r.op, r.direction, r.shape, r.dtype, r.backend, format_time(r.time_s),
             "-" if r.speedup is None else f"{r.speedup:.2f}x", format_rate(r),
             "-" if r.fraction_of_limit is None else f"{100 * r.fraction_of_limit:.0f}%", format_status(r))
            for r in records]


def format_table(records: Sequence[Record]) -> str:
    rows = table_rows(records)
    widths = [max(len(str(c)) for c in column) for column in zip(COLUMNS, *rows, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def format_limits(limits: MachineLimits, device: torch.device) -> str:
    parts = [f"copy {limits.copy_bytes_per_s / 1e9:.1f} GB/s (read + write)"]
    unit, scale = rate_unit("FLOP", device.type)
    parts += [f"{dtype} matmul {rate / scale:.3g} {unit}" for dtype, rate in limits.matmul_flop_per_s.items()]
    return "measured limits: " + ", ".join(parts)


# ----------------------------------------------------------------------------- files


def write_json(path: Path, info: dict, limits: MachineLimits | None, records: Sequence[Record]) -> None:
    payload = {"machine": info,
               "limits": None if limits is None else {"copy_bytes_per_s": limits.copy_bytes_per_s,
                                                      "matmul_flop_per_s": limits.matmul_flop_per_s},
               "records": [_finite(r) for r in records]}
    path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")


def _finite(record: Record) -> dict:
    # JSON has no NaN or Inf; a wrong kernel's error can be either, so it is written as a string.
    row = record.as_dict()
    for key, value in row.items():
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            row[key] = str(value)
    return row


def write_csv(path: Path, records: Sequence[Record]) -> None:
    fields = list(Record.__dataclass_fields__)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for record in records:
            writer.writerow(record.as_dict())


def write_plots(directory: Path, records: Sequence[Record]) -> list[Path]:
    """One PNG per op: speed-up over torch against problem size, a line per backend, pass and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []
    for op in dict.fromkeys(r.op for r in records):
        series: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
        for r in records:
            if r.op == op and r.backend != "torch" and r.speedup is not None:
                series.setdefault((r.backend, r.direction, r.dtype), []).append((r.size, r.speedup))
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for (backend, direction, dtype), points in sorted(series.items()):
            points.sort()
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      linestyle="-" if direction == "fwd" else "--", label=f"{backend} {direction} {dtype}")
        axes.axhline(1.0, color="black", linewidth=1, linestyle=":", label="torch")
        sizes = sorted({r.size for r in records if r.op == op})
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(s) for s in sizes])
        axes.set_yscale("log", base=2)
        axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.set_xlabel(OPS[op].size_meaning if op in OPS else "size")
        axes.set_ylabel("speed-up over torch (higher is better)")
        device = next(r.device for r in records if r.op == op)
        axes.set_title(f"{op} on {device}: attnkernels vs torch")
        if not series:
            axes.text(0.5, 0.5, "no correct measurement", transform=axes.transAxes, ha="center")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"speedup_{op}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def write_outputs(directory: Path, info: dict, limits: MachineLimits | None, records: Sequence[Record]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / "results.json", directory / "results.csv"
    write_json(json_path, info, limits, records)
    write_csv(csv_path, records)
    return [json_path, csv_path, *write_plots(directory, records)]


def results_markdown(info: dict, limits: MachineLimits | None, records: Sequence[Record]) -> str:
    device = torch.device(info["device"])
    machine = info["gpu"] or f"{info['cpu']} ({info['cpu_count']} logical cores, {info['torch_threads']} torch threads)"
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m attnkernels.bench --results-md bench/RESULTS.md`; do not edit by hand,",
        "run the command again. The GPU check's measurements (scripts/gpu_check.sh): bench/RESULTS-gpu.md.",
        "",
        f"- Date: {info['date']}",
        f"- Command: `{info['command']}`",
        f"- Machine: {machine}; {info['platform']}",
        f"- CPU kernels: the `{info.get('cpu_capability')}` variant (the best this CPU runs unless "
        "ATTNKERNELS_CPU_CAPABILITY names a lower one); "
        f"torch's CPU kernels: `{info.get('torch_cpu_capability')}`; "
        f"the CPU's vector flags: {info.get('cpu_flags') or 'none found'}",
        f"- CPU sampling paths (measured once per process, or forced): {info.get('cpu_sampling_paths')}",
        f"- Versions: attnkernels {info['attnkernels']}, torch {info['torch']} (CUDA {info['cuda']}), "
        f"Triton {info['triton']}, Python {info['python']}",
    ]
    if info.get("isa_caps"):
        caps = ", ".join(f"{name}={value}" for name, value in info["isa_caps"].items())
        lines.append(f"- Instruction sets capped for torch and its libraries: {caps}")
    if info.get("load_average_at_start") is not None:
        load = ", ".join(str(v) for v in info["load_average_at_start"])
        lines.append(f"- Load average when the run started (1, 5, 15 min): {load} "
                     "(CPU timings from a busy machine vary several-fold)")
    if limits is not None:
        text = format_limits(limits, device)
        lines.append(f"- {text[0].upper()}{text[1:]}")
    lines += [
        "",
        "Time is the median of many repetitions after a warm-up, inputs rotated among several copies; torch is",
        "measured in the same run. Each result is checked against torch before it is timed (WRONG: not timed).",
        "Rates: GB/s by the minimum byte count for sampling (input read once + grid read + output written;",
        "forward + backward also reads them again and writes the gradients), FLOP/s for attention",
        "(forward 4·B·H·L·S·E, half when causal, backward 2.5x forward). \"of limit\": the fraction of the",
        "measured copy bandwidth (sampling) or matmul throughput in the same dtype (attention; for float16 and",
        "bfloat16 the higher of that and float32's), each limit from the fastest of its repetitions (on the CPU",
        "the better of two probes, before and after the cases), and compared with the case's fastest call (not",
        "the median that \"time\" and \"rate\" give).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in table_rows(records)]
    return "\n".join(lines) + "\n"
