"""Plain-PyTorch references written from the math: the independent oracles."""

from .grid_sample import affine_grid, affine_grid_sample, grid_sample

__all__ = ["affine_grid", "affine_grid_sample", "grid_sample"]
