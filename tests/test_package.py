"""Packaging: the import works without the compiled extension, and backends are reported honestly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import attnkernels

PACKAGE = Path(attnkernels.__file__).parent


def test_available_backends_lists_reference_last_and_cpu_when_built():
    backends = attnkernels.available_backends()
    assert backends[-1] == "reference"
    assert ("cpu" in backends) == attnkernels._extension.has_extension()
    assert ("cuda" in backends) == (torch.cuda.is_available() and attnkernels._extension.has_cuda_kernels())


def test_import_without_extension_warns_once_and_uses_reference(tmp_path):
    """A copy of the package without _C: imports with one warning, and grid_sample still works."""
    copy = tmp_path / "attnkernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    script = f"PREFIX = {str(tmp_path)!r}\n" + """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import attnkernels
assert attnkernels.__file__.startswith(PREFIX), attnkernels.__file__
ours = [w for w in caught if "attnkernels" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "reference" in str(ours[0].message)
import torch, torch.nn.functional as F
assert "cpu" not in attnkernels.available_backends()
x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
g = torch.rand(1, 3, 4, 2, dtype=torch.float64) * 2 - 1
out = attnkernels.grid_sample(x, g, align_corners=False)
torch.testing.assert_close(out, F.grid_sample(x, g, align_corners=False))
try:
    attnkernels.grid_sample(x, g, align_corners=False, backend="cpu")
except RuntimeError as error:
    assert "not loaded" in str(error), error
else:
    raise AssertionError("the cpu backend should be refused")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
