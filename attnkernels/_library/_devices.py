"""The one-device check of the fake kernels.

A meta tensor among CPU tensors dispatches to the fake (Meta) kernel, not to the
CPU one: without this check it returns uninitialised CPU tensors.
"""

from __future__ import annotations

import torch


def check_one_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raises naming the first tensor that is not on the device of the first one."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise RuntimeError(f"attnkernels::{op}: expected `{name}` on the device of `{first_name}` "
                               f"({first.device}), got {t.device}")
