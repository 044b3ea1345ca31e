"""attnkernels: fused spatial-transformer sampling and attention kernels for PyTorch.

    import attnkernels
    out = attnkernels.grid_sample(input, grid, align_corners=False)
    out = attnkernels.affine_grid_sample(video, theta, align_corners=False)   # fused STN sampler

Every op has backends ``cuda``, ``triton``, ``cpu`` and ``reference`` (plain
PyTorch); ``backend=None`` picks the best one for the inputs.
"""

from . import _extension

if _extension.has_extension():
    from ._library import compiled  # noqa: F401  (fake kernels and autograd of the C++ ops)

from . import nn  # modules: SpatialTransformer, MultiheadSelfAttention, SpatialSoftAttention
from ._dispatch import available_backends
from ._extension import cpu_capability
from .attention import attention_with_lse, merge_attention, scaled_dot_product_attention
from .patching import patch_torch, patched, unpatch_torch
from .sampling import affine_grid, affine_grid_sample, grid_sample

__version__ = "0.1.0"

# Sequence-parallel attention lives in attnkernels.distributed, imported on first use so that
# `import attnkernels` does not set up torch.distributed machinery nobody asked for.
_LAZY = {"distributed": None, "ring_attention": "ring_attention"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(".distributed", __name__)
        return module if _LAZY[name] is None else getattr(module, _LAZY[name])
    raise AttributeError(f"module 'attnkernels' has no attribute {name!r}")

__all__ = ["affine_grid", "affine_grid_sample", "available_backends", "cpu_capability", "grid_sample"]
__all__ += ["nn", "patch_torch", "patched", "unpatch_torch"]
__all__ += ["attention_with_lse", "merge_attention", "scaled_dot_product_attention"]
__all__ += ["distributed", "ring_attention"]
