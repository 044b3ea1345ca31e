"""Blind checks of the CUDA attention kernels, run without a GPU (in CI).

- The host-side launch logic (csrc/cuda/attention_launch.h) passes its C++ unit test, which also
  checks the GPU's dropout generator against the CPU kernel's.
- The kernel sources compile with nvcc for sm_80 and sm_90; ptxas (-Xptxas -v) reports no local
  memory (stack frame, spill stores/loads) in any forward or backward kernel, and registers within
  the designed occupancy: 4-warp blocks, 2 per SM (1 at head dim 256), so at most 255 registers per
  thread (65536 / (2 x 128) = 256, and 255 is the hardware cap); shared memory is all dynamic
  (sized in attention_launch.h, checked by the C++ test).
- The SASS (cuobjdump) of every main kernel uses tensor-core MMA (HMMA), ldmatrix (LDSM) and
  asynchronous global-to-shared copies (LDGSTS, cp.async).

Compiled objects are cached in the temp dir under a hash of the sources and flags, so a rerun
is instant; a fresh run compiles 6 files (two at a time), about two minutes on 2 cores.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNEL_FILES = [f"attention_{direction}_hdim{d}.cu" for direction in ("forward", "backward") for d in (64, 128, 256)]
ARCHES = ("80", "90")
# The flags torch's extension build gives nvcc (setup.py), as far as they change code generation.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "-Xcompiler", "-fPIC"]
MAX_REGISTERS = 255

# The backward's last template argument is its first head-dim column (two passes at head dim 256).
KERNEL_NAME = re.compile(r"attention_(forward|backward)_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELb([01])E(?:Li(\d+)E)?")
DTYPES = {"6__half": "fp16", "13__nv_bfloat16": "bf16"}


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuobjdump(nvcc: str) -> str | None:
    beside = os.path.join(os.path.dirname(nvcc), "cuobjdump")
    if os.path.isfile(beside):
        return beside
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # Triton wheels bundle the CUDA binary utilities
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return bundled if os.path.isfile(bundled) else None
    except ImportError:
        return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc (CUDA toolkit) found: set CUDA_HOME")


def kernel_id(mangled: str) -> str | None:
    """'forward/bf16/hdim128/plain', 'backward/fp16/hdim256/masked/cols128' for a main kernel's mangled
    name, else None."""
    match = KERNEL_NAME.search(mangled)
    if match is None:
        return None
    direction, dtype, dim, general, first_column = match.groups()
    name = f"{direction}/{DTYPES[dtype]}/hdim{dim}/{'masked' if general == '1' else 'plain'}"
    return name + (f"/cols{first_column}" if first_column not in (None, "0") else "")


EXPECTED_KERNELS = {f"{direction}/{dtype}/hdim{dim}/{variant}{columns}"
                    for direction, dim, columns in (("forward", 64, ""), ("forward", 128, ""), ("forward", 256, ""),
                                                    ("backward", 64, ""), ("backward", 128, ""),
                                                    ("backward", 256, ""), ("backward", 256, "/cols128"))
                    for dtype in ("fp16", "bf16") for variant in ("plain", "masked")}


def parse_ptxas(log: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, 'sm_XX'): {registers, stack, spill_stores, spill_loads, smem}} from ptxas -v output."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if match:
            current = (match.group(1), match.group(2))
            found[current] = {"registers": -1, "stack": -1, "spill_stores": -1, "spill_loads": -1, "smem": 0}
            continue
        if current is None:
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if match:
            found[current].update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                                  spill_loads=int(match.group(3)))
        match = re.search(r"Used (\d+) registers", line)
        if match:
            found[current]["registers"] = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            found[current]["smem"] = int(smem.group(1)) if smem else 0
    return found


def _cache_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(glob.glob(str(CSRC / "cuda" / "attention_*"))) + [str(CSRC / "cpu" / "attention_math.h")]:
        digest.update(Path(path).read_bytes())
    digest.update(" ".join([NVCC or "", *NVCC_FLAGS, *ARCHES]).encode())
    directory = Path(tempfile.gettempdir()) / "attnkernels-cuda-attention-static" / digest.hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _compile(source: str, directory: Path) -> tuple[Path, str]:
    obj = directory / source.replace(".cu", ".o")
    log = directory / source.replace(".cu", ".ptxas.txt")
    if not (obj.exists() and log.exists()):
        gencode = [flag for arch in ARCHES for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
        command = [NVCC, *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-I", str(CSRC), "-c",
                   str(CSRC / "cuda" / source), "-o", str(obj) + ".partial"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"nvcc failed on {source}:\n{' '.join(command)}\n{result.stderr[-4000:]}")
        log.write_text(result.stdout + result.stderr)
        os.replace(str(obj) + ".partial", obj)
    return obj, log.read_text()


@pytest.fixture(scope="module")
def compiled():
    """{source: (object path, ptxas log)}, compiled for every arch (cached)."""
    directory = _cache_dir()
    workers = max(1, min(2, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(zip(KERNEL_FILES, pool.map(lambda s: _compile(s, directory), KERNEL_FILES), strict=True))
    return results


@pytest.fixture(scope="module")
def resources(compiled):
    """{(kernel id, 'sm_XX'): ptxas numbers} for the main kernels."""
    table = {}
    for _, log in compiled.values():
        for (mangled, arch), numbers in parse_ptxas(log).items():
            name = kernel_id(mangled)
            if name is not None:
                table[(name, arch)] = numbers
    return table


def test_parse_ptxas_reads_spills_and_registers():
    log = ("ptxas info    : Compiling entry function '_ZN11attnkernels14cuda_attention24attention_forward_kernelI"
           "13__nv_bfloat16Li128ELb0EEEvNS0_15AttentionParamsE' for 'sm_90'\n"
           "ptxas info    : Function properties for x\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")
    ((mangled, arch), numbers), = parse_ptxas(log).items()
    assert kernel_id(mangled) == "forward/bf16/hdim128/plain" and arch == "sm_90"
    assert kernel_id("_ZN11attnkernels14cuda_attention25attention_backward_kernelI6__halfLi256ELb1ELi128EEEvNS0_"
                     "15AttentionParamsE") == "backward/fp16/hdim256/masked/cols128"
    assert kernel_id("attention_backward_kernelI6__halfLi64ELb0ELi0EEEv") == "backward/fp16/hdim64/plain"
    assert numbers == {"registers": 255, "stack": 8, "spill_stores": 4, "spill_loads": 12, "smem": 1024}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the C++ unit test")
def test_launch_logic_cpp_unit_test(tmp_path):
    binary = tmp_path / "attention_launch_test"
    # C++20 for the CPU header it compares with; the launch header itself is also checked as C++17.
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-I", str(CSRC), str(ROOT / "tests" / "cpp" /
                            "attention_launch_test.cpp"), "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    cxx17 = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++", "-"], input='#include '
                           '"cuda/attention_launch.h"\nint main() { return 0; }\n', capture_output=True, text=True,
                           cwd=str(CSRC))
    assert cxx17.returncode == 0, cxx17.stderr


@needs_nvcc
def test_every_kernel_is_compiled_for_every_arch(resources):
    for arch in ARCHES:
        built = {name for name, kernel_arch in resources if kernel_arch == f"sm_{arch}"}
        assert built == EXPECTED_KERNELS, (arch, sorted(EXPECTED_KERNELS ^ built))


@needs_nvcc
def test_no_local_memory_and_registers_within_the_design(resources):
    problems = []
    for (name, arch), numbers in sorted(resources.items()):
        if numbers["stack"] or numbers["spill_stores"] or numbers["spill_loads"]:
            problems.append(f"{name} {arch}: {numbers['stack']} bytes stack, {numbers['spill_stores']} spill stores, "
                            f"{numbers['spill_loads']} spill loads")
        if not 0 < numbers["registers"] <= MAX_REGISTERS:
            problems.append(f"{name} {arch}: {numbers['registers']} registers")
        if numbers["smem"]:
            problems.append(f"{name} {arch}: {numbers['smem']} bytes of static shared memory (expected dynamic only)")
    assert not problems, "\n".join(problems)
    print("\n".join(f"{name} {arch}: {n['registers']} registers" for (name, arch), n in sorted(resources.items())),
          file=sys.stderr)


@needs_nvcc
def test_sass_uses_tensor_cores_ldmatrix_and_cp_async(compiled):
    cuobjdump = _cuobjdump(NVCC)
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's bundled copy) to read the SASS")
    seen = set()
    for obj, _ in compiled.values():
        result = subprocess.run([cuobjdump, "--dump-sass", str(obj)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        arch = None
        for chunk in re.split(r"\n(?=\s*Fatbin elf code:|\s*code for sm_|\s*Function : )", result.stdout):
            arch_match = re.search(r"code for (sm_\d+)", chunk)
            if arch_match:
                arch = arch_match.group(1)
            function = re.search(r"Function : (\S+)", chunk)
            if function is None or kernel_id(function.group(1)) is None:
                continue
            name = kernel_id(function.group(1))
            for instruction in ("HMMA.16816.F32", "LDSM", "LDGSTS"):
                assert instruction in chunk, f"{name} ({arch}) has no {instruction} in its SASS"
            seen.add((name, arch))
    assert {name for name, _ in seen} == EXPECTED_KERNELS
    assert {arch for _, arch in seen} == {f"sm_{arch}" for arch in ARCHES}


def test_cuda_backend_declines_what_the_kernels_do_not_serve(monkeypatch):
    # The dispatch rules of attnkernels/attention.py past the device check, on CPU tensors.
    import torch

    from attnkernels import _dispatch, attention

    monkeypatch.setattr(_dispatch, "why_not_device", lambda tensor, backend, op: None)

    def why_not(E=64, Ev=None, dtype=torch.bfloat16, grad=False, L=16, batch=(2,), heads=4):
        q = torch.empty(*batch, heads, L, E, dtype=dtype, requires_grad=grad)
        v = torch.empty(*batch, heads, L, Ev or E, dtype=dtype)
        return attention._cuda_why_not(q, q, v, None)

    assert why_not() is None and why_not(dtype=torch.float16, E=256) is None and why_not(E=8, Ev=200) is None
    assert why_not(E=128, grad=True) is None and why_not(E=256, Ev=40, grad=True) is None
    assert "float32" in why_not(dtype=torch.float32) and "float64" in why_not(dtype=torch.float64)
    assert "up to 256" in why_not(E=264)
    assert "up to 256" in why_not(E=8, Ev=257, grad=True)
    assert "batch entries" in why_not(batch=(300, 300), L=1, E=8)
    assert "batch entries" in why_not(heads=65536, L=1, E=8, batch=(1,))
