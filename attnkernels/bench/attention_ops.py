"""The attention benchmark ops: attention at a fixed number of tokens, and the sdpa_* ops at
FlashAttention's shapes against torch's SDPA default and cuDNN.

FLOP counts (FlashAttention's convention):
    attention forward:     4·B·H·L·S·E, half when causal;  fwd+bwd: 3.5x forward; bwd: 2.5x

attention_pooling (one query per head over every token: a class token or pooling query, a decoding
step) does a few FLOPs per key and value it reads, so it is counted in bytes, the least that must
move: forward reads q, k, v and writes the output; the backward reads them and the output gradient
again and writes the gradients of q, k, v.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnkernels

from .op_spec import Inputs, OpSpec, Shape, randn

# Attention: a fixed number of tokens (batch x sequence) per device, so every size does the same
# number of rows and the FLOPs grow linearly with the sequence length.
_ATTENTION_TOKENS = {"cpu": 2048, "cuda": 16384}
_ATTENTION_HEADS = {"cpu": 8, "cuda": 16}
_ATTENTION_HEAD_DIM = {"cpu": 64, "cuda": 128}


def _attention_shape(size: int, device_type: str) -> Shape:
    return {"B": max(1, _ATTENTION_TOKENS[device_type] // size), "H": _ATTENTION_HEADS[device_type],
            "L": size, "S": size, "E": _ATTENTION_HEAD_DIM[device_type]}


def _attention_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
    q_shape = (shape["B"], shape["H"], shape["L"], shape["E"])
    kv_shape = (shape["B"], shape["H"], shape["S"], shape["E"])
    return {"query": randn(q_shape, dtype, device, generator), "key": randn(kv_shape, dtype, device, generator),
            "value": randn(kv_shape, dtype, device, generator)}


def _attention_flops(causal: bool) -> Callable[[Shape, torch.dtype, bool], float]:
    def work(shape: Shape, dtype: torch.dtype, backward: bool) -> float:
        forward = 4.0 * shape["B"] * shape["H"] * shape["L"] * shape["S"] * shape["E"] * (0.5 if causal else 1.0)
        return forward * 3.5 if backward else forward
    return work


def _attention_ops() -> list[OpSpec]:
    ops = []
    for causal in (False, True):
        ops.append(OpSpec(
            name="attention_causal" if causal else "attention",
            public_function="scaled_dot_product_attention",
            size_meaning="sequence length (L = S; batch x L fixed)",
            work_unit="FLOP",
            shape=_attention_shape,
            make_inputs=_attention_inputs,
            output_shape=lambda s: (s["B"], s["H"], s["L"], s["E"]),
            torch_impl=lambda x, causal=causal: F.scaled_dot_product_attention(
                x["query"], x["key"], x["value"], is_causal=causal),
            ours=lambda x, backend, causal=causal: attnkernels.scaled_dot_product_attention(
                x["query"], x["key"], x["value"], is_causal=causal, backend=backend),
            differentiable_inputs=("query", "key", "value"),
            work=_attention_flops(causal),
            label=lambda s: f"B={s['B']} H={s['H']} L={s['L']} E={s['E']}",
            default_sizes={"cpu": (256, 512, 1024), "cuda": (512, 1024, 2048, 4096, 8192)},
            quick_sizes={"cpu": (128,), "cuda": (1024,)},
        ))
    return ops


# Attention pooling: one query per head against every token; a fixed number of tokens (batch x S).
_POOLING_TOKENS = {"cpu": 16384, "cuda": 262144}


def _pooling_shape(size: int, device_type: str) -> Shape:
    return {"B": max(1, _POOLING_TOKENS[device_type] // size), "H": _ATTENTION_HEADS[device_type], "L": 1,
            "S": size, "E": _ATTENTION_HEAD_DIM[device_type]}


def _pooling_bytes(shape: Shape, dtype: torch.dtype, backward: bool) -> float:
    element = torch.empty((), dtype=dtype).element_size()
    heads = shape["B"] * shape["H"]
    queries = heads * shape["L"] * shape["E"] * element
    keys_and_values = 2 * heads * shape["S"] * shape["E"] * element
    forward = 2 * queries + keys_and_values
    # backward: q, k, v, out and dO read; dq, dk, dv written
    return forward + (3 * queries + keys_and_values) + (queries + keys_and_values) if backward else forward


def _pooling_op() -> OpSpec:
    return OpSpec(
        name="attention_pooling",
        public_function="scaled_dot_product_attention",
        size_meaning="keys per query (L = 1; batch x S fixed)",
        work_unit="B",
        shape=_pooling_shape,
        make_inputs=_attention_inputs,
        output_shape=lambda s: (s["B"], s["H"], s["L"], s["E"]),
        torch_impl=lambda x: F.scaled_dot_product_attention(x["query"], x["key"], x["value"]),
        ours=lambda x, backend: attnkernels.scaled_dot_product_attention(x["query"], x["key"], x["value"],
                                                                         backend=backend),
        differentiable_inputs=("query", "key", "value"),
        work=_pooling_bytes,
        label=lambda s: f"B={s['B']} H={s['H']} L=1 S={s['S']} E={s['E']}",
        default_sizes={"cpu": (256, 1024, 4096), "cuda": (1024, 4096, 16384)},
        quick_sizes={"cpu": (256,), "cuda": (4096,)},
    )


# FlashAttention's benchmark shapes for the CUDA kernels: 16k tokens (batch x L), model width
# 2048 (heads = 2048 / E), head dims 64 and 128, L = 1k ... 16k; against torch's default SDPA
# (sdpa_*) and its cuDNN backend (sdpa_cudnn_*: cuDNN takes float16/bfloat16 CUDA tensors only,
# other cases fall back to the default, which also computes the wider-precision check).
def _sdpa_shape(head_dim: int) -> Callable[[int, str], Shape]:
    def shape(size: int, device_type: str) -> Shape:
        tokens, width = (16384, 2048) if device_type == "cuda" else (1024, 256)
        return {"B": max(1, tokens // size), "H": width // head_dim, "L": size, "S": size, "E": head_dim}
    return shape


def _torch_sdpa(causal: bool, cudnn: bool) -> Callable[[Inputs], torch.Tensor]:
    def run(x: Inputs) -> torch.Tensor:
        q, k, v = x["query"], x["key"], x["value"]
        if cudnn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _sdpa_ops() -> list[OpSpec]:
    ops = []
    for baseline in ("sdpa", "sdpa_cudnn"):
        for head_dim in (64, 128):
            for causal in (False, True):
                ops.append(OpSpec(
                    name=f"{baseline}_hdim{head_dim}" + ("_causal" if causal else ""),
                    public_function="scaled_dot_product_attention",
                    size_meaning="sequence length (L = S; batch x L = 16k)",
                    work_unit="FLOP",
                    shape=_sdpa_shape(head_dim),
                    make_inputs=_attention_inputs,
                    output_shape=lambda s: (s["B"], s["H"], s["L"], s["E"]),
                    torch_impl=_torch_sdpa(causal, cudnn=baseline == "sdpa_cudnn"),
                    ours=lambda x, backend, causal=causal: attnkernels.scaled_dot_product_attention(
                        x["query"], x["key"], x["value"], is_causal=causal, backend=backend),
                    differentiable_inputs=("query", "key", "value"),
                    work=_attention_flops(causal),
                    label=lambda s: f"B={s['B']} H={s['H']} L={s['L']} E={s['E']}",
                    default_sizes={"cpu": (128, 256), "cuda": (1024, 2048, 4096, 8192, 16384)},
                    quick_sizes={"cpu": (128,), "cuda": (2048,)},
                ))
    return ops


def attention_ops() -> list[OpSpec]:
    """Every attention op, in the order the bench command lists them."""
    return [*_attention_ops(), _pooling_op(), *_sdpa_ops()]
