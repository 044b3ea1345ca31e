"""Blind check of the CUDA sampling kernels, run without a GPU (in CI): ptxas reports no local
memory (stack frame, spills) in any nearest or (bi/tri)linear kernel of the float32 units with 32-bit
indexing, forward and backward, 2-D and 3-D.

Local memory there means the per-tap indices, weights and validity flags went to memory that each
channel's taps re-read: the 3-D trilinear forward ran 6x slower than torch on an H200 for that reason
(nvcc kept a loop and a division per tap in the channel loop). Bicubic kernels keep their 16 or 64
taps' coefficients partly in local memory by design and are not checked.

Needs nvcc and the CUDA build of torch (for ATen's headers), as scripts/compile_cuda_unit.py does; the
logs are cached in the temp dir under a hash of the sources, so a rerun is instant. A fresh run
compiles 2 units, about 75 s on 2 cores.
"""

from __future__ import annotations

import glob
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_cuda_attention_static import NVCC, needs_nvcc, parse_ptxas

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("sampler_instances_float_forward.cu", "sampler_instances_float_backward.cu")
CHECKED_KERNELS = ("sample_forward_pointwise", "sample_forward_channels_last", "sample_backward_kernel",
                   "tap_keys_kernel")
INTERPOLATION = {"0": "bilinear", "1": "nearest", "2": "bicubic"}  # sampling::generic::Interpolation


def _torch_has_cuda_headers() -> bool:
    from torch.utils import cpp_extension

    return any(Path(path, "ATen", "cuda").is_dir() for path in cpp_extension.include_paths())


def _ptxas_log(unit: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(str(ROOT / "csrc" / "**" / "*"), recursive=True)):
        if Path(path).is_file() and Path(path).suffix in (".h", ".cuh", ".cu"):
            digest.update(Path(path).read_bytes())
    digest.update((NVCC or "").encode())
    log = Path(tempfile.gettempdir()) / "attnkernels-cuda-sampling-static" / digest.hexdigest()[:16] / f"{unit}.txt"
    if not log.exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_cuda_unit.py"),
                                 str(ROOT / "csrc" / "cuda" / unit), "--arch", "90", "--ptxas-verbose"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"nvcc failed on {unit}:\n{result.stderr[-4000:]}")
        log.write_text(result.stdout + result.stderr)
    return log.read_text()


def _demangle(names: list[str]) -> list[str]:
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


@needs_nvcc
@pytest.mark.parametrize("unit", UNITS)
def test_linear_and_nearest_kernels_use_no_local_memory(unit):
    if not _torch_has_cuda_headers():
        pytest.skip("this torch has no CUDA headers (ATen/cuda): the sampler units include them")
    kernels = parse_ptxas(_ptxas_log(unit))
    mangled = [name for name, _ in kernels]
    checked = 0
    offenders = []
    for (name, arch), demangled in zip(kernels, _demangle(mangled), strict=True):
        match = re.match(r"void attnkernels::cuda::(\w+)<(.*)", demangled)
        if match is None or match.group(1) not in CHECKED_KERNELS:
            continue
        kernel, arguments = match.groups()
        mode = INTERPOLATION[arguments.split("Interpolation)", 1)[1][0]]
        wide_index = kernel in ("sample_forward_pointwise", "sample_backward_kernel") and (
            arguments.split(", ")[2] == "long")  # <scalar_t, acc_t, index_t, ...>
        if mode == "bicubic" or wide_index:
            continue
        checked += 1
        stats = kernels[(name, arch)]
        if stats["stack"] or stats["spill_stores"] or stats["spill_loads"]:
            offenders.append(f"{demangled[:160]}: {stats}")
    # 2 modes x 2 dims x 2 coordinate sources x 2 kernels
    assert checked == 16, f"{checked} kernels checked in {unit}, not 16: did the kernel names change?"
    assert not offenders, "local memory in:\n" + "\n".join(offenders)
