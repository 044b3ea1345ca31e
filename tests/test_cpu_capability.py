"""The CPU variant of the compiled kernels (csrc/cpu/cpu_dispatch.cpp): reported, forceable, and safe to link.

scripts/test_cpu_capabilities.sh runs the CPU-kernel tests under every variant this machine can run.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attnkernels

pytestmark = pytest.mark.skipif(not attnkernels._extension.has_extension(), reason="the extension is not built")

ORDER = ("default", "avx2", "avx512", "avx512_bf16", "avx512_amx")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def built_variants() -> bool:
    """Whether the library holds the avx2 and avx512 objects (setup.py builds them on x86-64)."""
    return any("::avx512::" in name for name, _ in exported_functions())


def best_for_this_cpu() -> str:
    flags = cpu_flags()
    if not X86 or not built_variants():
        return "default"
    if not {"avx2", "fma", "f16c"} <= flags:
        return "default"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    if "avx512_bf16" not in flags:
        return "avx512"
    # AMX also needs the OS to grant the tile state (Linux 5.16 and later do when asked).
    return "avx512_amx" if {"amx_bf16", "amx_tile"} <= flags else "avx512_bf16"


def run_python(code: str, capability: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ATTNKERNELS_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATTNKERNELS_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


REPORT = """
import torch, torch.nn.functional as F, attnkernels
x = torch.randn(2, 16, 5, 6, 7)
g = torch.rand(2, 4, 3, 5, 3) * 2.2 - 1.1
torch.testing.assert_close(attnkernels.grid_sample(x, g, align_corners=False, backend="cpu"),
                           F.grid_sample(x, g, align_corners=False))
q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
torch.testing.assert_close(attnkernels.scaled_dot_product_attention(q, k, v, backend="cpu"),
                           F.scaled_dot_product_attention(q, k, v))
print("capability", attnkernels.cpu_capability())
"""


def reported(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return re.search(r"^capability (\S+)$", result.stdout, re.M).group(1)


def test_the_variant_in_use_is_reported():
    expected = os.environ.get("ATTNKERNELS_CPU_CAPABILITY") or best_for_this_cpu()
    assert attnkernels.cpu_capability() == expected


def test_the_sampling_paths_in_use_are_reported(monkeypatch):
    """cpu_sampling_paths() names the paths the variant's sampling forwards take, and says when the environment
    forces one (the bench header shows it)."""
    paths = attnkernels._extension.cpu_sampling_paths()
    capability = attnkernels.cpu_capability()
    if capability == "default":
        assert paths == "point by point (no vector tiles in this variant)"
        return
    assert re.fullmatch(r"3-4 channel fp32 forwards read (pixel quads|gathers) \((measured|forced by "
                        r"ATTNKERNELS_PIXEL_QUADS)\); gathers load (x-neighbour pairs|single taps).*", paths), paths
    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", "on")
    assert "read pixel quads (forced by ATTNKERNELS_PIXEL_QUADS)" in attnkernels._extension.cpu_sampling_paths()
    monkeypatch.setenv("ATTNKERNELS_PIXEL_QUADS", "off")
    monkeypatch.setenv("ATTNKERNELS_PAIR_GATHERS", "off")
    paths = attnkernels._extension.cpu_sampling_paths()
    assert "read gathers (forced by ATTNKERNELS_PIXEL_QUADS)" in paths
    if capability == "avx2":  # the only variant that chooses how its gathers load
        assert paths.endswith("gathers load single taps (forced by ATTNKERNELS_PAIR_GATHERS)"), paths
    else:
        assert paths.endswith("gathers load x-neighbour pairs"), paths


def test_unforced_the_best_variant_for_this_cpu_is_used():
    assert reported(run_python(REPORT, None)) == best_for_this_cpu()


@pytest.mark.parametrize("capability", ORDER)
def test_forcing_a_variant_this_cpu_runs_uses_it(capability):
    if ORDER.index(capability) > ORDER.index(best_for_this_cpu()):
        pytest.skip(f"this CPU (or build) cannot run the {capability} variant")
    result = run_python(REPORT, capability)
    assert reported(result) == capability
    assert "ATTNKERNELS_CPU_CAPABILITY" not in result.stderr


def test_forcing_a_variant_this_cpu_lacks_warns_and_uses_the_best():
    best = best_for_this_cpu()
    if best == "avx512_amx":
        pytest.skip("this CPU runs every variant")
    result = run_python(REPORT, "avx512_amx")
    assert reported(result) == best
    assert "ATTNKERNELS_CPU_CAPABILITY=avx512_amx cannot be used" in result.stderr
    assert f"using the best available variant, '{best}'" in result.stderr


def test_an_unknown_variant_name_warns_and_uses_the_best():
    result = run_python(REPORT, "avx9000")
    assert reported(result) == best_for_this_cpu()
    expected = ("ATTNKERNELS_CPU_CAPABILITY=avx9000 is not one of 'default', 'avx2', 'avx512', 'avx512_bf16', "
                "'avx512_amx'")
    assert expected in result.stderr


def exported_functions() -> list[tuple[str, str]]:
    """(demangled name, disassembly) of every global or weak function that attnkernels._C defines."""
    library = attnkernels._extension._C.__file__
    symbols = subprocess.run(["nm", "--defined-only", "-C", library], capture_output=True, text=True, check=True)
    shared = {line.split(" ", 2)[2] for line in symbols.stdout.splitlines()
              if len(line.split(" ", 2)) == 3 and line.split(" ", 2)[1] in ("T", "W", "V", "u", "i")}
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    functions = []
    for block in listing.split("\n\n"):
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", block.strip().split("\n", 1)[0])
        if header and header.group(1) in shared:
            functions.append((header.group(1), block))
    return functions


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs x86-64 and binutils (nm, objdump)")
def test_no_shared_function_uses_avx():
    """The linker keeps one copy of each inline function of torch, the C++ library and ours for the whole
    library. Any such copy that is not named after a variant (our code lives in attnkernels::cpu::avx2 / avx512,
    csrc/cpu_isa.h) can be called from default-variant code, so it must be plain x86-64 code: no VEX or EVEX
    instruction (their mnemonics start with 'v'), or the library would die with SIGILL on an older CPU."""
    offenders = []
    for name, body in exported_functions():
        if "::avx2::" in name or "::avx512::" in name:
            continue
        vex = [line.split("\t")[-1] for line in body.splitlines()[1:]
               if re.match(r"v[a-z0-9]+", line.split("\t")[-1].strip())]
        if vex:
            offenders.append(f"{name}: {vex[0].strip()}")
    assert not offenders, f"{len(offenders)} shared functions use AVX code:\n" + "\n".join(offenders[:20])
