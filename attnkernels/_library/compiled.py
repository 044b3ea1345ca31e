"""Fake kernels and autograd of the C++ ops (attnkernels::<op>, CPU and CUDA kernels).

Imported only when the extension is loaded: the schemas live in csrc/ops.cpp. The CUDA attention
kernel regenerates the CPU kernel's counter-based dropout mask, which the reference reproduces
(``kernel_dropout_mask``), so its double backward serves dropout.
"""

from __future__ import annotations

import torch

from ..reference.attention import kernel_dropout_mask
from .attention import register_attention
from .sampling import register_affine_grid, register_sampler

_ops = torch.ops.attnkernels

register_sampler("grid_sample", _ops.grid_sample.default, _ops.grid_sample_backward.default)
register_sampler("affine_grid_sample", _ops.affine_grid_sample.default, _ops.affine_grid_sample_backward.default)
register_affine_grid(_ops.affine_grid.default, _ops.affine_grid_backward.default,
                     transpose_op=_ops.affine_grid_backward.default)
register_attention(_ops.attention.default, _ops.attention_backward.default, dropout_mask=kernel_dropout_mask)
