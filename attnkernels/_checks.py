"""Argument checks shared by the public sampling and attention functions, with torch's wording."""

from __future__ import annotations

import torch


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attnkernels.{op}: expected `{name}` to be a torch.Tensor, got {type(t).__name__}")


def check_like(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``t`` has the dtype and device of ``like``."""
    if t.dtype != like.dtype:
        raise RuntimeError(f"attnkernels.{op}: expected `{name}` to have the dtype of `{like_name}` ({like.dtype}), "
                           f"got {t.dtype}")
    if t.device != like.device:
        raise RuntimeError(f"attnkernels.{op}: expected `{name}` on the device of `{like_name}` ({like.device}), "
                           f"got {t.device}")
