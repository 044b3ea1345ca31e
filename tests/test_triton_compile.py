"""The Triton kernels compile for an H100 (sm_90) on this machine, GPU or not.

The interpreter that runs the other Triton tests on CPU tensors skips Triton's compiler, which is
stricter; Triton ships ptxas, so attnkernels.triton._compile_check compiles a representative set of
kernel specialisations down to cubins in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attnkernels._dispatch import triton_installed

if not triton_installed():
    pytest.skip("Triton is not installed", allow_module_level=True)


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "attnkernels.triton._compile_check"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from attnkernels.triton._compile_check import attention_cases, sampling_cases

    expected = len(list(attention_cases(False))) + len(list(sampling_cases(False)))
    assert expected >= 30  # the size-1 specialisations are part of the default set
    assert result.stdout.count(": ok,") == expected, result.stdout
    assert "'every int': 1" in result.stdout and "'WIDE': True" in result.stdout
