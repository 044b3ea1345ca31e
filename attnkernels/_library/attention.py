"""Fake kernels and autograd for attnkernels::attention and attention_backward.

attention's backward is the fused attention_backward op. Its own backward (the
double backward, for gradient penalties) recomputes attention with the
reference implementation, which autograd differentiates twice; with dropout it
rebuilds the kernel's mask from the seed, so the result is exact.
"""

from __future__ import annotations

import torch

from ..reference import attention as reference
from ._devices import check_one_device

_ops = torch.ops.attnkernels


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("attnkernels::attention")
def _attention_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, dropout_seed):
    check_one_device("attention", query=query, key=key, value=value, attn_mask=attn_mask)
    batch, heads, length, _ = query.shape
    out = query.new_empty((batch, heads, length, value.shape[-1]))
    lse = query.new_empty((batch, heads, length), dtype=reference.accumulation_dtype(query.dtype))
    return out, lse


@torch.library.register_fake("attnkernels::attention_backward")
def _attention_backward_fake(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale,
                             dropout_seed, output_mask):
    check_one_device("attention_backward", query=query, key=key, value=value, attn_mask=attn_mask,
                     grad_out=grad_out, grad_lse=grad_lse, out=out, lse=lse)
    acc = reference.accumulation_dtype(query.dtype)

    def gradient(t, wanted):
        return t.new_empty(t.shape) if wanted else t.new_empty((0,))

    if output_mask[3] and attn_mask is not None:
        grad_mask = query.new_empty((*query.shape[:3], key.shape[2]), dtype=acc)
    else:
        grad_mask = query.new_empty((0,), dtype=acc)
    return gradient(query, output_mask[0]), gradient(key, output_mask[1]), gradient(value, output_mask[2]), grad_mask


# ----------------------------------------------------------------------------- autograd


def _attention_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, dropout_seed)
    ctx.options = (dropout_p, is_causal, scale)


def _attention_backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse, dropout_seed = ctx.saved_tensors
    mask_has_grad = attn_mask is not None and attn_mask.is_floating_point()
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
              ctx.needs_input_grad[3] and mask_has_grad]
    dropout_p, is_causal, scale = ctx.options
    grads = _ops.attention_backward(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal,
                                    scale, dropout_seed, wanted)
    return (*(g if w else None for g, w in zip(grads, wanted, strict=True)), None, None, None, None)


torch.library.register_autograd("attnkernels::attention", _attention_backward, setup_context=_attention_setup)


def _attention_backward_setup(ctx, inputs, output):
    (grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, dropout_seed,
     output_mask) = inputs
    ctx.save_for_backward(grad_out, grad_lse, query, key, value, attn_mask, dropout_seed)
    ctx.options = (dropout_p, is_causal, scale)
    ctx.output_mask = output_mask


def _attention_double_backward(ctx, grad_grad_q, grad_grad_k, grad_grad_v, grad_grad_mask):
    grad_out, grad_lse, query, key, value, attn_mask, dropout_seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.options
    keep = None
    if dropout_p > 0:
        shape = (*query.shape[:3], key.shape[2])
        keep = reference.kernel_dropout_mask(int(dropout_seed.item()), shape, dropout_p, query.device)
    mask_is_float = attn_mask is not None and attn_mask.is_floating_point()
    with torch.enable_grad():
        go = grad_out.detach().requires_grad_(True)
        gl = (torch.zeros(query.shape[:3], dtype=reference.accumulation_dtype(query.dtype), device=query.device)
              if grad_lse is None else grad_lse.detach()).requires_grad_(True)
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        mask = attn_mask.detach().requires_grad_(True) if mask_is_float else attn_mask
        out, lse = reference.attention_with_lse(q, k, v, mask, dropout_p, is_causal, scale, dropout_mask=keep)
        leaves = [q, k, v, mask if mask_is_float else None]
        live = [leaf for leaf in leaves if leaf is not None]
        firsts = dict(zip(map(id, live), torch.autograd.grad((out, lse), live, (go, gl), create_graph=True,
                                                                  allow_unused=True), strict=True))
        outputs, cotangents = [], []
        for leaf, wanted, grad_grad in zip(leaves, ctx.output_mask, (grad_grad_q, grad_grad_k, grad_grad_v,
                                                                     grad_grad_mask), strict=True):
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
    return grad_go, grad_gl, grad_q, grad_k, grad_v, grad_mask, None, None, None, None, None, None, None


torch.library.register_autograd("attnkernels::attention_backward", _attention_double_backward,
                                setup_context=_attention_backward_setup)
