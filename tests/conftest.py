"""Shared test configuration.

- The `cuda` marker skips without a GPU.
- Without a GPU, the Triton kernels run on CPU tensors through the Triton
  interpreter (TRITON_INTERPRET=1, set here before anything imports Triton), so
  that one `python -m pytest` covers every backend; set TRITON_INTERPRET=0 to
  leave them out.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from attnkernels import available_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    return [b for b in available_backends() if b != "cuda"]
