"""The reference backend's entries in the ops' backend tables: plain PyTorch serves every op, dtype,
mode and feature on every device (the entries take the sampling modes as numbers, as the kernels do)."""

from __future__ import annotations

from .._dispatch import Backend
from .._modes import INTERPOLATION_NAMES, PADDING_NAMES
from .attention import attention_with_lse
from .grid_sample import affine_grid, affine_grid_sample, grid_sample


def _grid_sample(input, grid, interpolation: int, padding: int, align_corners: bool):
    return grid_sample(input, grid, INTERPOLATION_NAMES[interpolation], PADDING_NAMES[padding], align_corners)


def _affine_grid_sample(input, theta, size, interpolation: int, padding: int, align_corners: bool):
    return affine_grid_sample(input, theta, size, INTERPOLATION_NAMES[interpolation], PADDING_NAMES[padding],
                              align_corners)


BACKENDS = {
    "grid_sample": Backend("reference", run=_grid_sample),
    "affine_grid": Backend("reference", run=affine_grid),
    "affine_grid_sample": Backend("reference", run=_affine_grid_sample),
    "attention": Backend("reference", run=attention_with_lse),
}
