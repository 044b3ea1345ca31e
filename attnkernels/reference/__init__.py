"""Plain-PyTorch references written from the math: the independent oracles."""

from .attention import attention_with_lse, merge_attention, scaled_dot_product_attention
from .grid_sample import affine_grid, affine_grid_sample, grid_sample

__all__ = ["affine_grid", "affine_grid_sample", "attention_with_lse", "grid_sample", "merge_attention",
           "scaled_dot_product_attention"]
