"""Shared test configuration: the `cuda` marker skips without a GPU."""

import pytest
import torch

from attnkernels import available_backends

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


def cpu_backends() -> list[str]:
    """Backends that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1)."""
    return [b for b in available_backends() if b != "cuda"]
