"""Argument checks shared by the public sampling and attention functions, with torch's wording, and the
shape broadcasting they use."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attnkernels.{op}: expected `{name}` to be a torch.Tensor, got {type(t).__name__}")


def check_like(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``t`` has the dtype and device of ``like``."""
    if t.dtype != like.dtype:
        raise RuntimeError(f"attnkernels.{op}: expected `{name}` to have the dtype of `{like_name}` ({like.dtype}), "
                           f"got {t.dtype}")
    if t.is_cpu and like.is_cpu:  # the common case, without building device objects (~0.3 us each)
        return
    if t.device != like.device:
        raise RuntimeError(f"attnkernels.{op}: expected `{name}` on the device of `{like_name}` ({like.device}), "
                           f"got {t.device}")


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """``torch.broadcast_shapes`` as a tuple; raises RuntimeError when the shapes do not broadcast.

    Plain-int sizes are broadcast here: torch's goes through its symbolic-shape machinery, about
    10 us a call. Any other size (a SymInt under torch.compile) goes to torch's, which knows how to
    guard on it.
    """
    rank = 0
    for shape in shapes:  # a plain loop: torch 2.11's dynamo cannot trace max() over a map
        rank = max(rank, len(shape))
    result = [1] * rank
    for shape in shapes:
        offset = len(result) - len(shape)
        for i, size in enumerate(shape):
            if not isinstance(size, int):
                return tuple(torch.broadcast_shapes(*shapes))
            current = result[offset + i]
            if size == current or size == 1:
                continue
            if current != 1:
                raise RuntimeError(f"shapes {', '.join(str(list(s)) for s in shapes)} do not broadcast")
            result[offset + i] = size
    return tuple(result)
