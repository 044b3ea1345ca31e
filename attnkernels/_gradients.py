"""Gradient helpers shared by the autograd registrations of every backend (C++ ops and Triton ops)."""

from __future__ import annotations

import torch


def gradient_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels give an input's gradient: channels-last for a channels-last input
    that is not also contiguous, else contiguous (the C++ kernels' rule, mirrored by fake kernels)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def empty_gradient_like(t: torch.Tensor, needed: bool) -> torch.Tensor:
    """A fake kernel's stand-in for an input's gradient: its shape and the kernels' layout, or empty."""
    if not needed:
        return t.new_empty((0,))
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).contiguous(memory_format=gradient_memory_format(t))


def second_order(forward, grad_output, primals, wanted, grads_of_grads):
    """Gradients of (vjp of ``forward`` at ``primals`` with ``grad_output``) against
    ``grad_output`` and ``primals``, contracted with ``grads_of_grads``.

    This is the backward of a registered backward op (double backward). ``forward`` is a
    reference implementation, which autograd differentiates twice.
    """
    with torch.enable_grad():
        go = grad_output.detach().requires_grad_(True)
        leaves = [p.detach().requires_grad_(True) for p in primals]
        firsts = torch.autograd.grad(forward(*leaves), leaves, go, create_graph=True, allow_unused=True)
        outputs, cotangents = [], []
        for first, want, gg in zip(firsts, wanted, grads_of_grads, strict=True):
            if want and first is not None and gg is not None:
                outputs.append(first)
                cotangents.append(gg)
        if not outputs:
            return [None] * (1 + len(primals))
        return list(torch.autograd.grad(outputs, [go, *leaves], cotangents, allow_unused=True))
