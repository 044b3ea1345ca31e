"""attnkernels: fused spatial-transformer sampling and attention kernels for PyTorch.

    import attnkernels
    out = attnkernels.grid_sample(input, grid, align_corners=False)
    out = attnkernels.affine_grid_sample(video, theta, align_corners=False)   # fused STN sampler

Every op has backends ``cuda``, ``triton``, ``cpu`` and ``reference`` (plain
PyTorch); ``backend=None`` picks the best one for the inputs.
"""

from . import _extension

if _extension.has_extension():
    from . import _library  # noqa: F401  (fake kernels and autograd of the C++ ops)

from . import nn  # modules: SpatialTransformer, MultiheadSelfAttention, SpatialSoftAttention
from ._dispatch import available_backends
from ._extension import cpu_capability
from .attention import attention_with_lse, merge_attention, scaled_dot_product_attention
from .patching import patch_torch, patched, unpatch_torch
from .sampling import affine_grid, affine_grid_sample, grid_sample

__version__ = "0.1.0"

__all__ = ["affine_grid", "affine_grid_sample", "available_backends", "cpu_capability", "grid_sample"]
__all__ += ["nn", "patch_torch", "patched", "unpatch_torch"]
__all__ += ["attention_with_lse", "merge_attention", "scaled_dot_product_attention"]
