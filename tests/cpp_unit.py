"""Building and running the C++ unit tests of tests/cpp with each CPU variant's flags."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The flags setup.py gives each variant (without -mprefer-vector-width, which changes no semantics).
VARIANT_FLAGS = {
    "avx512": ["-DATTNKERNELS_CPU_AVX512", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq"],
    "avx2": ["-DATTNKERNELS_CPU_AVX2", "-mavx2", "-mfma", "-mf16c"],
}
needs_gxx = pytest.mark.skipif(not X86 or shutil.which("g++") is None, reason="needs x86-64 and g++")


def build_and_run(source: str, tmp_path: Path, flags: list[str], standard: str = "c++17") -> str:
    """Compiles tests/cpp/<source> with ``flags`` against csrc and torch's headers, runs it and returns what it
    printed; fails the test when the build or the run fails, skips it when the binary says "skip". C++17 is the
    oldest standard the extension is built with (torch 2.11); a test that includes ATen's tensor headers needs
    C++20 with the newer torch releases."""
    from torch.utils.cpp_extension import include_paths

    binary = tmp_path / Path(source).stem
    build = subprocess.run(["g++", f"-std={standard}", "-O1", *flags, "-I", str(ROOT / "csrc"), "-I",
                            include_paths()[0], str(ROOT / "tests" / "cpp" / source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    if run.stdout.startswith("skip"):
        pytest.skip(run.stdout.strip())
    assert run.stdout.startswith("ok"), run.stdout
    return run.stdout
