"""The command line of ``python -m attnkernels.bench`` (also ``attnkernels-bench``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from . import report, timing
from .cases import (
    DEFAULT_PASSES,
    OPS,
    PASSES,
    Case,
    available_ops,
    build_cases,
    default_backends,
    default_dtypes,
    usable_backends,
)
from .runner import apply_limits, measure_limits, run_cases

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
          "fp64": torch.float64, "double": torch.float64}

EXIT_WRONG = 1  # some kernel gave a wrong result or crashed
EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit code 2 (argparse prints the usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    ops = ", ".join(OPS)
    parser = _OneLineParser(
        prog="attnkernels-bench",
        description="Benchmark every attnkernels op on every available backend against torch's own op. "
                    "Each result is checked against torch before it is timed.",
        epilog="exit status: 0 all correct; 1 some kernel was WRONG or crashed (reported, not timed); "
               "2 bad arguments",
    )
    parser.add_argument("--op", default=None,
                        help=f"comma-separated ops, or a prefix naming several (grid_sample, attention); from: {ops}")
    parser.add_argument("--backend", default=None,
                        help="comma-separated attnkernels backends (default: every available one); torch always runs")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes: float32, float16, bfloat16, float64 (default: per device)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated sizes: the side of the image or volume for sampling, the sequence "
                             "length for attention (default: per device)")
    parser.add_argument("--pass", dest="passes", default=",".join(DEFAULT_PASSES),
                        help="comma-separated passes: fwd, fwd+bwd, bwd (the backward alone, after a forward "
                             "outside the timing) (default: fwd,fwd+bwd)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="one small size per op and short timing")
    parser.add_argument("--out", type=Path, default=None, help="write results.json, results.csv and PNG plots here")
    parser.add_argument("--results-md", type=Path, default=None,
                        help="write a Markdown report (machine, versions, date, table), e.g. bench/RESULTS.md")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _select_ops(parser: argparse.ArgumentParser, text: str | None) -> list[str]:
    available = available_ops()
    if text is None:
        return available
    chosen: list[str] = []
    for name in _comma_list(text):
        matches = [op for op in OPS if op == name or op.startswith(name + "_")]
        if not matches:
            parser.error(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        missing = [op for op in matches if op not in available]
        if missing:
            parser.error(f"op {missing[0]!r} needs attnkernels.{OPS[missing[0]].public_function}, "
                         "which this installation does not have")
        chosen += [op for op in matches if op not in chosen]
    if not chosen:
        parser.error("--op selects no op")
    return chosen


def _select_backends(parser: argparse.ArgumentParser, text: str | None, device: torch.device) -> list[str]:
    available = usable_backends(device)
    if text is None:
        return default_backends(device)
    chosen = []
    for name in _comma_list(text):
        if name == "torch":
            continue  # always measured
        if name not in available:
            parser.error(f"backend {name!r} is not available on {device.type} here "
                         f"(available: {', '.join(['torch', *available])})")
        if name not in chosen:
            chosen.append(name)
    return chosen


def _select_dtypes(parser: argparse.ArgumentParser, text: str | None, device: torch.device) -> list[torch.dtype]:
    if text is None:
        return list(default_dtypes(device.type))
    chosen = []
    for name in _comma_list(text):
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from float32, float16, bfloat16, float64")
        dtype = DTYPES[name]
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            parser.error(f"dtype {name!r} is not supported by {torch.cuda.get_device_name(device)}")
        if dtype not in chosen:
            chosen.append(dtype)
    return chosen


def _select_sizes(parser: argparse.ArgumentParser, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(part) for part in _comma_list(text)]
    except ValueError:
        parser.error(f"--sizes must be comma-separated positive integers, got {text!r}")
    if not sizes or min(sizes) <= 0:
        parser.error(f"--sizes must be comma-separated positive integers, got {text!r}")
    return sizes


def _select_passes(parser: argparse.ArgumentParser, text: str) -> list[str]:
    passes = _comma_list(text)
    if not passes:  # else nothing runs and the command reports success
        parser.error(f"--pass selects no pass; choose from {', '.join(PASSES)}")
    for name in passes:
        if name not in PASSES:
            parser.error(f"unknown pass {name!r}; choose from {', '.join(PASSES)}")
    return passes


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _footprint(case: Case) -> int:
    """A generous estimate of the bytes one case holds at once: its inputs, outputs, gradients, the rotated
    copies and the float64 check (torch's math attention holds the L x S scores)."""
    shape = case.shape
    element = torch.empty((), dtype=case.dtype).element_size()
    if "L" in shape:
        heads = shape["B"] * shape["H"]
        return heads * (shape["L"] * shape["S"] * 8 * 3 + (shape["L"] + 2 * shape["S"]) * shape["E"] * element * 8)
    return math.prod(shape.values()) * max(element, 8) * 8


def _check_sizes_fit(parser: argparse.ArgumentParser, cases: Sequence[Case], device: torch.device) -> None:
    """Refuses sizes whose cases cannot fit in the device's memory, before anything is allocated."""
    memory = _device_memory(device)
    for case in cases:
        if _footprint(case) > memory // 2:
            parser.error(f"--sizes {case.size} is too large for {case.op} ({case.label}, {case.dtype_name}): it "
                         f"needs about {_footprint(case) / 2**30:.1f} GiB, and {device.type} memory here is "
                         f"{memory / 2**30:.1f} GiB")


def _check_writable(parser: argparse.ArgumentParser, out: Path | None, results_md: Path | None) -> None:
    """Fails at once (exit 2) on an output path that cannot be written, not after the whole run."""
    def probe(directory: Path, option: str, path: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as error:
            parser.error(f"{option} {path}: cannot write there ({error.strerror or error})")

    if out is not None:
        if out.exists() and not out.is_dir():
            parser.error(f"--out {out}: exists and is not a directory")
        probe(out, "--out", out)
    if results_md is not None:
        if results_md.is_dir():
            parser.error(f"--results-md {results_md}: is a directory")
        probe(results_md.parent, "--results-md", results_md)
        if results_md.exists() and not os.access(results_md, os.W_OK):
            parser.error(f"--results-md {results_md}: the file is not writable")


def _write_outputs(directory: Path, info: dict, limits, records) -> None:
    """results.json, results.csv and, when matplotlib is installed, the PNG plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        directory.mkdir(parents=True, exist_ok=True)
        for name, write in (("results.json", lambda p: report.write_json(p, info, limits, records)),
                            ("results.csv", lambda p: report.write_csv(p, records))):
            write(directory / name)
            print(f"wrote {directory / name}")
        print("no plots: they need matplotlib (pip install matplotlib)", file=sys.stderr)
        return
    for path in report.write_outputs(directory, info, limits, records):
        print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0, or 1 when some kernel was wrong or crashed (2: bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = _select_ops(parser, args.op)
    backends = _select_backends(parser, args.backend, device)
    dtypes = _select_dtypes(parser, args.dtype, device)
    if not dtypes:
        parser.error("--dtype selects no dtype; choose from float32, float16, bfloat16, float64")
    sizes = _select_sizes(parser, args.sizes)
    passes = _select_passes(parser, args.passes)

    skipped = [op for op in OPS if op not in ops and args.op is None]
    for op in skipped:
        print(f"skipping {op}: attnkernels.{OPS[op].public_function} does not exist in this installation",
              file=sys.stderr)

    _check_writable(parser, args.out, args.results_md)
    cases = build_cases(ops, device, dtypes, sizes, quick=args.quick, passes=passes)
    _check_sizes_fit(parser, cases, device)
    budget = timing.QUICK if args.quick else timing.FULL
    info = report.machine_info(device)
    print("measuring the machine's limits (copy bandwidth, matmul throughput)...", file=sys.stderr)
    limits = measure_limits(device, cases, budget, small=args.quick)
    records = run_cases(cases, backends, budget, limits, show_progress=not args.no_progress)
    if device.type == "cpu" and not args.quick:
        # A neighbour busy through the first probe would make the limits too low (a fraction over 100%):
        # probe again after the cases and keep the better of the two.
        print("measuring the machine's limits again...", file=sys.stderr)
        limits = limits.best_of(measure_limits(device, cases, budget))
        apply_limits(records, limits)

    load = info["load_average_at_start"]
    print(f"attnkernels benchmark on {info['gpu'] or info['cpu']} ({device.type}), torch {info['torch']}, "
          f"{info['date']}" + (f", load average at start {load[0]}" if load else "")
          + f"; CPU kernels: the {info['cpu_capability']} variant (ATTNKERNELS_CPU_CAPABILITY), "
          f"torch's: {info['torch_cpu_capability']}; sampling paths: {info['cpu_sampling_paths']}"
          + "".join(f", {name}={value}" for name, value in info["isa_caps"].items()) + ", "
          f"CPU vector flags: {info['cpu_flags'] or 'none found'}")
    print(report.format_limits(limits, device))
    print(report.format_table(records))
    if args.out is not None:
        _write_outputs(args.out, info, limits, records)
    if args.results_md is not None:
        args.results_md.parent.mkdir(parents=True, exist_ok=True)
        args.results_md.write_text(report.results_markdown(info, limits, records))
        print(f"wrote {args.results_md}")
    failed = [r for r in records if r.status in ("WRONG", "error")]
    if failed:
        print(f"{len(failed)} measurement(s) failed: a kernel was wrong or crashed (see the status column)",
              file=sys.stderr)
        return EXIT_WRONG
    return 0
