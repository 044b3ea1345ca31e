"""Packaging: the import works without the compiled extension, and backends are reported honestly."""

from __future__ import annotations

import subprocess
import sys

import torch

import attnkernels


def test_available_backends_lists_reference_last_and_cpu_when_built():
    backends = attnkernels.available_backends()
    assert backends[-1] == "reference"
    assert ("cpu" in backends) == attnkernels._extension.has_extension()
    assert ("cuda" in backends) == (torch.cuda.is_available() and attnkernels._extension.has_cuda_kernels())


def test_import_without_extension_warns_once_and_uses_reference():
    """With attnkernels._C missing, the package imports with one warning and grid_sample still works.

    The extension is hidden from a fresh interpreter by a meta-path finder that refuses it, as an
    unbuilt tree would (an editable install would otherwise find the built one).
    """
    script = """
import importlib.abc, sys, warnings

class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "attnkernels._C":
            raise ImportError("No module named 'attnkernels._C'")
        return None

sys.meta_path.insert(0, NoExtension())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import attnkernels
ours = [w for w in caught if "attnkernels" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "reference" in str(ours[0].message)
import torch, torch.nn.functional as F
assert "cpu" not in attnkernels.available_backends()
x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
g = torch.rand(1, 3, 4, 2, dtype=torch.float64) * 2 - 1
out = attnkernels.grid_sample(x, g, align_corners=False)
torch.testing.assert_close(out, F.grid_sample(x, g, align_corners=False))
theta = torch.eye(2, 3, dtype=torch.float64).unsqueeze(0)
fused = attnkernels.affine_grid_sample(x, theta, align_corners=False)
torch.testing.assert_close(fused, x)
try:
    attnkernels.grid_sample(x, g, align_corners=False, backend="cpu")
except RuntimeError as error:
    assert "not loaded" in str(error), error
else:
    raise AssertionError("the cpu backend should be refused")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
