"""Fake kernels and autograd of the attention ops, the same rules for every backend's ops.

An attention pair is forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
-> (out, lse) and backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p,
is_causal, scale, seed, output_mask) -> (grad_query, grad_key, grad_value, grad_mask), a gradient
being empty where output_mask (4 bools) does not ask for it; the mask's gradient is in the
accumulation dtype.

The backward op's own backward (double backward, for gradient penalties) recomputes attention
with the plain-PyTorch reference, which autograd differentiates twice. With dropout it needs the
kernel's dropout mask, rebuilt from the seed by the backend's ``dropout_mask`` function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._dispatch import call_op, register_autograd
from ..reference import attention as reference
from ._devices import check_one_device
from ._names import op_name

# dropout_mask(seed, (B, Hq, L, S), dropout_p, device) -> bool tensor, True where a weight is kept
DropoutMask = Callable[[int, tuple[int, int, int, int], float, torch.device], torch.Tensor]


def _attention_fake(name: str):
    def fake(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
        check_one_device(name, query=query, key=key, value=value, attn_mask=attn_mask)
        batch, heads, length, _ = query.shape
        out = query.new_empty((batch, heads, length, value.shape[-1]))
        lse = query.new_empty((batch, heads, length), dtype=reference.accumulation_dtype(query.dtype))
        return out, lse
    return fake


def _attention_backward_fake(name: str):
    def fake(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
             output_mask):
        check_one_device(name, query=query, key=key, value=value, attn_mask=attn_mask, grad_out=grad_out,
                         grad_lse=grad_lse, out=out, lse=lse)
        acc = reference.accumulation_dtype(query.dtype)

        def gradient(t, wanted):
            return t.new_empty(t.shape) if wanted else t.new_empty((0,))

        if output_mask[3] and attn_mask is not None:
            grad_mask = query.new_empty((*query.shape[:3], key.shape[2]), dtype=acc)
        else:
            grad_mask = query.new_empty((0,), dtype=acc)
        return (gradient(query, output_mask[0]), gradient(key, output_mask[1]), gradient(value, output_mask[2]),
                grad_mask)
    return fake


def _setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, seed)
    ctx.options = (dropout_p, is_causal, scale)


def _backward_setup(ctx, inputs, output):
    (grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
     output_mask) = inputs
    ctx.save_for_backward(grad_out, grad_lse, query, key, value, attn_mask, seed)
    ctx.options = (dropout_p, is_causal, scale)
    ctx.output_mask = output_mask


def _second_order(ctx, grad_grads, keep):
    """Gradients of the first-order gradients (contracted with ``grad_grads``) against the backward
    op's tensor inputs, through the reference; ``keep`` is the dropout mask or None."""
    grad_out, grad_lse, query, key, value, attn_mask, _ = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.options
    mask_is_float = attn_mask is not None and attn_mask.is_floating_point()
    with torch.enable_grad():
        go = grad_out.detach().requires_grad_(True)
        gl = (torch.zeros(query.shape[:3], dtype=reference.accumulation_dtype(query.dtype), device=query.device)
              if grad_lse is None else grad_lse.detach()).requires_grad_(True)
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        mask = attn_mask.detach().requires_grad_(True) if mask_is_float else attn_mask
        # out and lse, inputs of the backward op, are functions of q, k, v and the mask: recomputing
        # them puts the total derivative on q, k, v and the mask, and none on out and lse.
        out, lse = reference.attention_with_lse(q, k, v, mask, dropout_p, is_causal, scale, dropout_mask=keep)
        leaves = [q, k, v, mask if mask_is_float else None]
        live = [leaf for leaf in leaves if leaf is not None]
        firsts = dict(zip(map(id, live), torch.autograd.grad((out, lse), live, (go, gl), create_graph=True,
                                                                  allow_unused=True), strict=True))
        outputs, cotangents = [], []
        for leaf, wanted, grad_grad in zip(leaves, ctx.output_mask, grad_grads, strict=True):
            first = None if leaf is None else firsts[id(leaf)]
            if wanted and first is not None and grad_grad is not None and grad_grad.numel() > 0:
                outputs.append(first)
                cotangents.append(grad_grad)
        if not outputs:
            return (None,) * 13
        inputs = [go, gl, q, k, v] + ([mask] if mask_is_float else [])
        grads = list(torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True))
    if not mask_is_float:
        grads.append(None)
    grad_go, grad_gl, grad_q, grad_k, grad_v, grad_mask = grads
    if grad_lse is None:
        grad_gl = None
    return grad_go, grad_gl, grad_q, grad_k, grad_v, grad_mask, *(None,) * 7


def register_attention(forward, backward, *, dropout_mask: DropoutMask) -> None:
    """Registers fake kernels and autograd of one backend's attention pair (torch OpOverloads or
    Triton CustomOpDefs). ``dropout_mask`` rebuilds the kernels' dropout mask from the seed for the
    double backward."""
    def backward_of_forward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
        mask_has_grad = attn_mask is not None and attn_mask.is_floating_point()
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                  ctx.needs_input_grad[3] and mask_has_grad]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        args = (grad_out, grad_lse, query, key, value, attn_mask, out, lse, *ctx.options, seed, wanted)
        grads = call_op(backward, args, (grad_out, grad_lse, query, key, value, attn_mask, out, lse))
        grad_q, grad_k, grad_v, grad_mask = (g if w else None for g, w in zip(grads, wanted, strict=True))
        if grad_mask is not None:
            grad_mask = grad_mask.to(attn_mask.dtype)
        return grad_q, grad_k, grad_v, grad_mask, None, None, None, None

    def double_backward(ctx, grad_grad_q, grad_grad_k, grad_grad_v, grad_grad_mask):
        query, key, seed = ctx.saved_tensors[2], ctx.saved_tensors[3], ctx.saved_tensors[6]
        dropout_p = ctx.options[0]
        keep = None
        if dropout_p > 0:
            keep = dropout_mask(int(seed.item()), (*query.shape[:3], key.shape[2]), dropout_p, query.device)
        return _second_order(ctx, (grad_grad_q, grad_grad_k, grad_grad_v, grad_grad_mask), keep)

    torch.library.register_fake(forward, _attention_fake(op_name(forward)))
    torch.library.register_fake(backward, _attention_backward_fake(op_name(backward)))
    register_autograd(forward, backward_of_forward, setup_context=_setup)
    register_autograd(backward, double_backward, setup_context=_backward_setup)
