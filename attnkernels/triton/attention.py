"""Fused attention on Triton, FlashAttention-2 style: ``attnkernels::triton_attention`` and its backward.

softmax(q kᵀ · scale + mask) v without storing the (L, S) scores:

- forward: one program per (block of BLOCK_M query rows, batch × query head); it streams the
  key/value blocks with an online softmax (running max and sum, in base 2), skips the blocks
  a causal mask hides entirely, and writes the output and the log-sum-exp of each row;
- backward: the scores are recomputed from the log-sum-exp. One kernel per key/value block
  accumulates dK and dV over the query rows of every query head that shares the KV head
  (GQA without atomics); another per query block accumulates dQ, and writes the score
  gradient when a float mask needs one.

Masks (bool: True attends; float: added to the scores) are read tile by tile through their
strides, so a broadcast mask (stride 0) costs no memory. Dropout draws one Philox number
per (batch, head, row, column) from a seed tensor, the same in forward and backward, so
nothing is stored. Head dims are padded to the next power of two (at least 16) with masked
loads, and no length needs to divide a block size. Accumulation is float32 (float64 for
float64 inputs).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._sampler import INTERPRETER

# Above this the (BLOCK_M, head dim) tiles no longer fit a GPU's registers in any config.
MAX_HEAD_DIM = 512

# Entries of the per-call parameter vector (in the accumulation dtype, so float64 stays exact).
_SCALE_LOG2 = tl.constexpr(0)
_SCALE = tl.constexpr(1)
_KEEP_SCALE = tl.constexpr(2)
_LOG2E = tl.constexpr(3)
_LN2 = tl.constexpr(4)


# ----------------------------------------------------------------------------- autotuning


def _configs(kind: str, interpreter: bool = INTERPRETER) -> list[triton.Config]:
    """Tile configs (BLOCK_M query rows x BLOCK_N key columns, warps, pipeline stages).

    Under the interpreter a single config, since every tile op is a numpy call there. On a GPU a
    short list in the FlashAttention-2 / Triton-tutorial range, so that autotuning (and compiling
    every config for each head dim and flag combination) stays within seconds.
    """
    if interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)]
    if kind == "forward":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                  (64, 64, 4, 2), (64, 32, 4, 4), (32, 32, 4, 2), (16, 32, 4, 2)]
    else:
        shapes = [(64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2),
                  (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in shapes]


def _fits(kind: str, m: int, n: int, warps: int, stages: int, block_e: int, block_ev: int, elem: int) -> bool:
    """Whether a config's tiles fit: 32-bit registers per thread for the live tiles (accumulators and
    scores in fp32, operands in the input dtype) and shared memory for the pipelined loads."""
    words = elem / 4
    if kind == "forward":  # acc (M, Ev), scores (M, N), q (M, E); streamed k, v
        live = m * block_ev + m * n + m * block_e * words
        shared = stages * n * (block_e + block_ev) * elem
    elif kind == "kv":  # dk (N, E), dv (N, Ev), k, v held; scores and dP (M, N); streamed q, dO
        live = n * (block_e + block_ev) * (1 + words) + 2 * m * n
        shared = stages * m * (block_e + block_ev) * elem
    else:  # dq (M, E), q, dO held; scores and dP (M, N); streamed k, v
        live = m * block_e + m * (block_e + block_ev) * words + 2 * m * n
        shared = stages * n * (block_e + block_ev) * elem
    return live / (32 * warps) <= 256 and shared <= 200 * 1024


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        """The configs that fit, and none whose tiles exceed the lengths twice over; at least the smallest."""
        args = {**named_args, **kwargs}
        elem = args["Q"].element_size()
        kept = [c for c in configs
                if _fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                         args["BLOCK_E"], args["BLOCK_EV"], elem)
                and c.kwargs["BLOCK_M"] <= max(16, 2 * args["L_BUCKET"])
                and c.kwargs["BLOCK_N"] <= max(16, 2 * args["S_BUCKET"])]
        kept = kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        return kept[:1] if one_config() else kept
    return prune


def one_config() -> bool:
    """ATTNKERNELS_TRITON_ONE_CONFIG=1: run the first config that fits instead of autotuning (tests, where
    compiling every config from a cold cache costs minutes); benchmarks leave it unset."""
    return os.environ.get("ATTNKERNELS_TRITON_ONE_CONFIG", "0") == "1"


# Tuned once per power-of-two bucket of the lengths, not per exact length.
_KEY = ["L_BUCKET", "S_BUCKET", "BLOCK_E", "BLOCK_EV", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT"]


# ----------------------------------------------------------------------------- shared tile helpers


@triton.jit
def _keep(seed, bh, rows, cols, dropout_p):
    """Whether dropout keeps each (row, column) of head bh: Philox keyed by (seed, bh), counters
    (column, row), so every element of every head has its own number."""
    zero = tl.zeros_like(rows[:, None] + cols[None, :]).to(tl.uint32)
    key = seed.to(tl.uint64) + (bh.to(tl.uint64) << 32)
    c0 = (zero + cols[None, :]).to(tl.uint32)
    c1 = (zero + rows[:, None]).to(tl.uint32)
    r0, _, _, _ = tl.philox(key, c0, c1, zero, zero)
    return _uniform(r0) >= dropout_p


@triton.jit
def _uniform(x):
    """uint32 random bits to a float32 in [0, 1)."""
    return (x >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _operand(x, DOT_FP32: tl.constexpr):
    """A loaded tile as a tl.dot operand. The interpreter's tl.dot has no bfloat16 (it holds bf16 as
    raw uint16), so there bf16 tiles are carried exactly in float32."""
    if DOT_FP32:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, DOT_FP32: tl.constexpr):
    """x rounded to the inputs' dtype for the next tl.dot, as on a GPU (kept in float32 by the interpreter)."""
    if DOT_FP32:
        return x.to(DTYPE).to(tl.float32)
    else:
        return x.to(DTYPE)


@triton.jit
def _scores(q, k_t, mask_ptr, rows, cols, L, S, m_l, m_s, params_ptr,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) scores in base 2: q kᵀ · scale · log2(e) (+ mask · log2(e)), -inf where
    masked, causal (column > row) or out of range."""
    s = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC) * tl.load(params_ptr + _SCALE_LOG2)
    inside = (rows[:, None] < L) & (cols[None, :] < S)
    if HAS_MASK:
        tile = tl.load(mask_ptr + rows[:, None] * m_l + cols[None, :] * m_s, mask=inside, other=0)
        if MASK_BOOL:
            s = tl.where(tile != 0, s, s + float("-inf"))  # added, as torch: a NaN or +inf score stays NaN
        else:
            s += tile.to(ACC) * tl.load(params_ptr + _LOG2E)
    keep = cols[None, :] < S
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, s, float("-inf"))


# ----------------------------------------------------------------------------- forward


@triton.autotune(configs=_configs("forward"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("forward")})
@triton.jit
def _forward_kernel(
    Q, K, V, Mask, Seed, Params, Out, Lse,
    q_b, q_h, q_l, q_e, k_b, k_h, k_s, k_e, v_b, v_h, v_s, v_e, m_b, m_h, m_l, m_s,
    Hq, L, S, E, EV, GROUP, dropout_p, L_BUCKET, S_BUCKET,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Out: (B, Hq, L, EV) contiguous; Lse: (B, Hq, L) natural log, -inf for fully masked rows."""
    # One grid axis (x, up to 2**31 - 1 programs): query blocks fastest, then batch × head.
    m_blocks = tl.cdiv(L, BLOCK_M)
    start_m = (tl.program_id(0) % m_blocks) * BLOCK_M
    bh = tl.program_id(0) // m_blocks
    b = bh // Hq
    h = bh % Hq
    kv_h = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + b.to(tl.int64) * q_b + h * q_h + rows[:, None] * q_l + e[None, :] * q_e,
                mask=(rows[:, None] < L) & (e[None, :] < E), other=0)
    q = _operand(q, DOT_FP32)
    k_base = K + b.to(tl.int64) * k_b + kv_h * k_h
    v_base = V + b.to(tl.int64) * v_b + kv_h * v_h
    mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
    row_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), ACC)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    end_n = S
    if IS_CAUSAL:
        end_n = tl.minimum(S, start_m + BLOCK_M)  # blocks right of the diagonal are skipped
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_base + cols[None, :] * k_s + e[:, None] * k_e,
                      mask=(cols[None, :] < S) & (e[:, None] < E), other=0)
        k_t = _operand(k_t, DOT_FP32)
        s = _scores(q, k_t, mask_base, rows, cols, L, S, m_l, m_s, Params,
                    HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row masked so far keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, bh, rows, cols, dropout_p), p, 0.0)
        v = tl.load(v_base + cols[:, None] * v_s + ev[None, :] * v_e,
                    mask=(cols[:, None] < S) & (ev[None, :] < EV), other=0)
        v = _operand(v, DOT_FP32)
        weights = _rounded(p, Q.dtype.element_ty, DOT_FP32)
        acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision=PRECISION, out_dtype=ACC)
        row_max = new_max
    empty = row_sum == 0  # every column masked: output 0, log-sum-exp -inf
    inverse = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, row_sum))
    if HAS_DROPOUT:
        inverse = inverse * tl.load(Params + _KEEP_SCALE)
    out = acc * inverse[:, None]
    out_base = Out + bh.to(tl.int64) * L * EV
    tl.store(out_base + rows[:, None] * EV + ev[None, :], out, mask=(rows[:, None] < L) & (ev[None, :] < EV))
    lse = tl.where(empty, float("-inf"), (row_max + tl.log2(tl.where(empty, 1.0, row_sum))) * tl.load(Params + _LN2))
    tl.store(Lse + bh.to(tl.int64) * L + rows, lse, mask=rows < L)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _probabilities(s, lse_log2):
    """exp2(s - lse) with rows past the end or fully masked (lse = +inf here) giving 0."""
    return tl.exp2(s - lse_log2[:, None])


@triton.autotune(configs=_configs("backward"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("kv")})
@triton.jit
def _backward_kv_kernel(
    Q, K, V, Mask, Seed, Params, GradOut, Lse, Delta, GradK, GradV,
    q_b, q_h, q_l, q_e, k_b, k_h, k_s, k_e, v_b, v_h, v_s, v_e, m_b, m_h, m_l, m_s, o_b, o_h, o_l, o_e,
    Hq, Hkv, L, S, E, EV, GROUP, dropout_p, L_BUCKET, S_BUCKET,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK (B, Hkv, S, E) and dV (B, Hkv, S, EV), contiguous in ACC; program (KV block, batch × KV head),
    summing over the GROUP query heads that read this KV head."""
    n_blocks = tl.cdiv(S, BLOCK_N)
    start_n = (tl.program_id(0) % n_blocks) * BLOCK_N
    bkv = tl.program_id(0) // n_blocks
    b = bkv // Hkv
    kv_h = bkv % Hkv
    cols = start_n + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    k = tl.load(K + b.to(tl.int64) * k_b + kv_h * k_h + cols[:, None] * k_s + e[None, :] * k_e,
                mask=(cols[:, None] < S) & (e[None, :] < E), other=0)
    k = _operand(k, DOT_FP32)
    v = tl.load(V + b.to(tl.int64) * v_b + kv_h * v_h + cols[:, None] * v_s + ev[None, :] * v_e,
                mask=(cols[:, None] < S) & (ev[None, :] < EV), other=0)
    v = _operand(v, DOT_FP32)
    k_t = tl.trans(k)
    v_t = tl.trans(v)
    grad_k = tl.zeros((BLOCK_N, BLOCK_E), ACC)
    grad_v = tl.zeros((BLOCK_N, BLOCK_EV), ACC)
    log2e = tl.load(Params + _LOG2E)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep_scale = tl.load(Params + _KEEP_SCALE)
    begin_m = 0
    if IS_CAUSAL:
        begin_m = (start_n // BLOCK_M) * BLOCK_M  # rows above the diagonal never see these columns
    for h in range(kv_h * GROUP, kv_h * GROUP + GROUP):
        bh = b * Hq + h
        q_base = Q + b.to(tl.int64) * q_b + h * q_h
        o_base = GradOut + b.to(tl.int64) * o_b + h * o_h
        mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
        for start_m in range(begin_m, L, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            in_rows = rows < L
            q = tl.load(q_base + rows[:, None] * q_l + e[None, :] * q_e, mask=in_rows[:, None] & (e[None, :] < E),
                        other=0)
            q = _operand(q, DOT_FP32)
            grad_out = tl.load(o_base + rows[:, None] * o_l + ev[None, :] * o_e,
                               mask=in_rows[:, None] & (ev[None, :] < EV), other=0)
            grad_out = _operand(grad_out, DOT_FP32)
            lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=in_rows, other=float("inf"))
            delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=in_rows, other=0)
            s = _scores(q, k_t, mask_base, rows, cols, L, S, m_l, m_s, Params,
                        HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC)
            p = _probabilities(s, tl.where(lse == float("-inf"), float("inf"), lse * log2e))
            grad_p = tl.dot(grad_out, v_t, input_precision=PRECISION, out_dtype=ACC)
            if HAS_DROPOUT:
                keep = _keep(seed, bh, rows, cols, dropout_p)
                p_dropped = tl.where(keep, p * keep_scale, 0.0)
                grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
            else:
                p_dropped = p
            weights = _rounded(p_dropped, Q.dtype.element_ty, DOT_FP32)
            grad_v += tl.dot(tl.trans(weights), grad_out, input_precision=PRECISION, out_dtype=ACC)
            grad_s = p * (grad_p - delta[:, None])
            grad_scores = _rounded(grad_s, Q.dtype.element_ty, DOT_FP32)
            grad_k += tl.dot(tl.trans(grad_scores), q, input_precision=PRECISION, out_dtype=ACC)
    grad_k = grad_k * tl.load(Params + _SCALE)
    out_rows = bkv.to(tl.int64) * S + cols
    tl.store(GradK + out_rows[:, None] * E + e[None, :], grad_k, mask=(cols[:, None] < S) & (e[None, :] < E))
    tl.store(GradV + out_rows[:, None] * EV + ev[None, :], grad_v, mask=(cols[:, None] < S) & (ev[None, :] < EV))


@triton.autotune(configs=_configs("backward"), key=_KEY, prune_configs_by={"early_config_prune": _pruner("q")})
@triton.jit
def _backward_q_kernel(
    Q, K, V, Mask, Seed, Params, GradOut, Lse, Delta, GradQ, GradMask,
    q_b, q_h, q_l, q_e, k_b, k_h, k_s, k_e, v_b, v_h, v_s, v_e, m_b, m_h, m_l, m_s, o_b, o_h, o_l, o_e,
    Hq, L, S, E, EV, GROUP, dropout_p, L_BUCKET, S_BUCKET,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    MASK_GRAD: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ (B, Hq, L, E) contiguous in ACC, and with MASK_GRAD the score gradient (B, Hq, L, S)."""
    # One grid axis (x, up to 2**31 - 1 programs): query blocks fastest, then batch × head.
    m_blocks = tl.cdiv(L, BLOCK_M)
    start_m = (tl.program_id(0) % m_blocks) * BLOCK_M
    bh = tl.program_id(0) // m_blocks
    b = bh // Hq
    h = bh % Hq
    kv_h = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    in_rows = rows < L
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    q = tl.load(Q + b.to(tl.int64) * q_b + h * q_h + rows[:, None] * q_l + e[None, :] * q_e,
                mask=in_rows[:, None] & (e[None, :] < E), other=0)
    q = _operand(q, DOT_FP32)
    grad_out = tl.load(GradOut + b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_l + ev[None, :] * o_e,
                       mask=in_rows[:, None] & (ev[None, :] < EV), other=0)
    grad_out = _operand(grad_out, DOT_FP32)
    lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=in_rows, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse * tl.load(Params + _LOG2E))
    delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=in_rows, other=0)
    k_base = K + b.to(tl.int64) * k_b + kv_h * k_h
    v_base = V + b.to(tl.int64) * v_b + kv_h * v_h
    mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
    grad_q = tl.zeros((BLOCK_M, BLOCK_E), ACC)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        keep_scale = tl.load(Params + _KEEP_SCALE)
    end_n = S
    if IS_CAUSAL:
        end_n = tl.minimum(S, start_m + BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * k_s + e[None, :] * k_e, mask=(cols[:, None] < S) & (e[None, :] < E),
                    other=0)
        k = _operand(k, DOT_FP32)
        v_t = tl.load(v_base + cols[None, :] * v_s + ev[:, None] * v_e,
                      mask=(cols[None, :] < S) & (ev[:, None] < EV), other=0)
        v_t = _operand(v_t, DOT_FP32)
        s = _scores(q, tl.trans(k), mask_base, rows, cols, L, S, m_l, m_s, Params,
                    HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC)
        p = _probabilities(s, lse)
        grad_p = tl.dot(grad_out, v_t, input_precision=PRECISION, out_dtype=ACC)
        if HAS_DROPOUT:
            keep = _keep(seed, bh, rows, cols, dropout_p)
            grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
        grad_s = p * (grad_p - delta[:, None])
        grad_scores = _rounded(grad_s, Q.dtype.element_ty, DOT_FP32)
        grad_q += tl.dot(grad_scores, k, input_precision=PRECISION, out_dtype=ACC)
        if MASK_GRAD:
            tl.store(GradMask + (bh.to(tl.int64) * L + rows[:, None]) * S + cols[None, :], grad_s,
                     mask=in_rows[:, None] & (cols[None, :] < S))
    grad_q = grad_q * tl.load(Params + _SCALE)
    tl.store(GradQ + (bh.to(tl.int64) * L + rows[:, None]) * E + e[None, :], grad_q,
             mask=in_rows[:, None] & (e[None, :] < E))


# ----------------------------------------------------------------------------- launch


def _buckets(L: int, S: int) -> tuple[int, int]:
    """The autotuning key's lengths: the next powers of two."""
    return triton.next_power_of_2(L), triton.next_power_of_2(S)


def _padded(dim: int) -> int:
    """Head dims are padded to a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(max(dim, 1)))


def _dot_in_float32(dtype: torch.dtype) -> bool:
    """Under the interpreter bfloat16 tiles go through tl.dot as float32 (see ``_operand``)."""
    return INTERPRETER and dtype == torch.bfloat16


def _accumulation(dtype: torch.dtype) -> tuple[torch.dtype, object, str]:
    """(accumulation dtype, its Triton dtype, tl.dot input precision): float32 inputs use IEEE
    float32 products, not TF32, as torch does by default."""
    if dtype == torch.float64:
        return torch.float64, tl.float64, "ieee"
    return torch.float32, tl.float32, "ieee" if dtype == torch.float32 else "tf32"


def _params(scale: float, dropout_p: float, acc: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-call constants in the accumulation dtype (a Python float reaches a kernel as float32)."""
    keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    log2e = 1.0 / math.log(2.0)
    return torch.tensor([scale * log2e, scale, keep_scale, log2e, math.log(2.0)], dtype=acc, device=device)


def _mask_strides(attn_mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(attn_mask.stride()) if attn_mask is not None else (0, 0, 0, 0)


@triton_op("attnkernels::triton_attention", mutates_args={})
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                  dropout_p: float, is_causal: bool, scale: float,
                  seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """query: (B, Hq, L, E); key: (B, Hkv, S, E); value: (B, Hkv, S, EV); attn_mask: None or (B, Hq, L, S)
    (any strides, bool or float); seed: int64 (1,) when dropout_p > 0.
    Returns out (B, Hq, L, EV) and the log-sum-exp (B, Hq, L) in the accumulation dtype."""
    B, Hq, L, E = query.shape
    Hkv, S, EV = key.shape[1], key.shape[2], value.shape[3]
    acc, tl_acc, precision = _accumulation(query.dtype)
    out = torch.empty((B, Hq, L, EV), dtype=query.dtype, device=query.device)
    lse = torch.empty((B, Hq, L), dtype=acc, device=query.device)
    if B * Hq * L == 0:
        return out, lse
    if S == 0:  # nothing to attend to: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    has_dropout = dropout_p > 0
    params = _params(scale, dropout_p, acc, query.device)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)

    wrap_triton(_forward_kernel)[grid](
        query, key, value, attn_mask if attn_mask is not None else query, seed if has_dropout else params,
        params, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *_mask_strides(attn_mask),
        Hq, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S),
        HAS_MASK=attn_mask is not None, MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
        IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout, PRECISION=precision, DOT_FP32=_dot_in_float32(query.dtype),
        ACC=tl_acc, BLOCK_E=_padded(E), BLOCK_EV=_padded(EV))
    return out, lse


@triton_op("attnkernels::triton_attention_backward", mutates_args={})
def _attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, query: torch.Tensor,
                           key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                           out: torch.Tensor, lse: torch.Tensor, dropout_p: float, is_causal: bool, scale: float,
                           seed: torch.Tensor | None, mask_grad: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients to query, key, value and (with mask_grad) the float mask, as (B, Hq, L, S) scores
    gradient; the caller's broadcasting of the mask reduces it."""
    B, Hq, L, E = query.shape
    Hkv, S, EV = key.shape[1], key.shape[2], value.shape[3]
    acc, tl_acc, precision = _accumulation(query.dtype)
    grad_q = torch.zeros((B, Hq, L, E), dtype=acc, device=query.device)
    grad_k = torch.zeros((B, Hkv, S, E), dtype=acc, device=query.device)
    grad_v = torch.zeros((B, Hkv, S, EV), dtype=acc, device=query.device)
    grad_mask = torch.zeros((B, Hq, L, S) if mask_grad else (0,), dtype=acc, device=query.device)
    if B * Hq * L * S > 0:
        # delta = rowsum(dO * O) (dropout included); a log-sum-exp gradient enters the same place.
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        delta = delta.contiguous()
        lse = lse.contiguous()
        has_dropout = dropout_p > 0
        params = _params(scale, dropout_p, acc, query.device)
        mask_arg = attn_mask if attn_mask is not None else query
        seed_arg = seed if has_dropout else params
        common = dict(HAS_MASK=attn_mask is not None,
                      MASK_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
                      IS_CAUSAL=is_causal, HAS_DROPOUT=has_dropout, PRECISION=precision,
                      DOT_FP32=_dot_in_float32(query.dtype), ACC=tl_acc,
                      BLOCK_E=_padded(E), BLOCK_EV=_padded(EV))
        strides = (*query.stride(), *key.stride(), *value.stride(), *_mask_strides(attn_mask), *grad_out.stride())

        def kv_grid(meta):
            return (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,)

        def q_grid(meta):
            return (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)

        wrap_triton(_backward_kv_kernel)[kv_grid](
            query, key, value, mask_arg, seed_arg, params, grad_out, lse, delta, grad_k, grad_v, *strides,
            Hq, Hkv, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S), **common)
        wrap_triton(_backward_q_kernel)[q_grid](
            query, key, value, mask_arg, seed_arg, params, grad_out, lse, delta, grad_q, grad_mask, *strides,
            Hq, L, S, E, EV, Hq // Hkv, float(dropout_p), *_buckets(L, S), MASK_GRAD=mask_grad, **common)
    mask_dtype = attn_mask.dtype if mask_grad and attn_mask is not None else acc
    return (grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), grad_mask.to(mask_dtype))


def _setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, seed)
    ctx.options = (dropout_p, is_causal, scale)
    ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[3]


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.options
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v, grad_mask = _attention_backward_op(
        grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, ctx.mask_grad)
    return grad_q, grad_k, grad_v, (grad_mask if ctx.mask_grad else None), None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


def _backward_setup(ctx, inputs, output):
    grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad = inputs
    ctx.save_for_backward(grad_out, grad_lse, query, key, value, attn_mask)
    ctx.options = (dropout_p, is_causal, scale, mask_grad)


def _double_backward(ctx, grad_grad_q, grad_grad_k, grad_grad_v, grad_grad_mask):
    """Second derivatives through the plain-PyTorch reference, which autograd differentiates twice.

    The backward op reads ``out`` and ``lse`` as inputs, but they are functions of q, k, v and the
    mask: the reference recomputes them, so the total derivative lands on q, k, v and the mask
    and none is returned for ``out`` and ``lse``.
    """
    grad_out, grad_lse, query, key, value, attn_mask = ctx.saved_tensors
    dropout_p, is_causal, scale, mask_grad = ctx.options
    if dropout_p > 0:
        raise RuntimeError("attnkernels: the triton attention has no double backward with dropout_p > 0 "
                           "(its dropout mask lives in the kernel's Philox stream); use dropout_p=0 or the "
                           "reference backend")
    from ..reference import attention_with_lse

    with torch.enable_grad():
        go = grad_out.detach().requires_grad_(True)
        gl = None if grad_lse is None else grad_lse.detach().requires_grad_(True)
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        mask = attn_mask.detach().requires_grad_(True) if mask_grad else attn_mask
        out, lse = attention_with_lse(q, k, v, mask, 0.0, is_causal, scale, q.shape[1] != k.shape[1])
        loss = (out * go).sum()
        if gl is not None:
            loss = loss + torch.where(torch.isfinite(lse), lse * gl, 0.0).sum()
        primals = [q, k, v] + ([mask] if mask_grad else [])
        firsts = torch.autograd.grad(loss, primals, create_graph=True)
        cotangents = [grad_grad_q, grad_grad_k, grad_grad_v] + ([grad_grad_mask] if mask_grad else [])
        pairs = [(f, c) for f, c in zip(firsts, cotangents, strict=True) if c is not None]
        wrt = [go] + ([gl] if gl is not None else []) + primals
        if not pairs:
            return (None,) * 13
        grads = list(torch.autograd.grad([f for f, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True))
    d_go = grads.pop(0)
    d_gl = grads.pop(0) if gl is not None else None
    d_q, d_k, d_v = grads[:3]
    d_mask = grads[3] if mask_grad else None
    return d_go, d_gl, d_q, d_k, d_v, d_mask, None, None, None, None, None, None, None


_attention_backward_op.register_autograd(_double_backward, setup_context=_backward_setup)


@_attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    B, Hq, L, _ = query.shape
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    return query.new_empty((B, Hq, L, value.shape[3])), query.new_empty((B, Hq, L), dtype=acc)


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, query, key, value, attn_mask, out, lse, dropout_p, is_causal,
                             scale, seed, mask_grad):
    B, Hq, L, _ = query.shape
    if mask_grad and attn_mask is not None:
        grad_mask = query.new_empty((B, Hq, L, key.shape[2]), dtype=attn_mask.dtype)
    else:
        grad_mask = query.new_empty((0,), dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), grad_mask


def _flatten_batch(t: torch.Tensor, batch: tuple[int, ...], tail: tuple[int, ...]) -> torch.Tensor:
    """Broadcast ``t`` to (*batch, *tail) and merge the batch dims, as a view when the strides
    allow (a broadcast mask stays stride 0), otherwise as a copy."""
    t = t.expand(*batch, *tail)
    flat = (math.prod(batch), *tail)
    try:
        return t.view(flat)
    except RuntimeError:
        return t.reshape(flat)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(query keyᵀ · scale + mask) value, and the log-sum-exp of each row.

    query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev), Hkv dividing Hq
    (Hkv < Hq only with enable_gqa); attn_mask: bool (True attends) or float (added), broadcastable
    to (..., Hq, L, S); scale: None for 1 / sqrt(E).
    Returns out (..., Hq, L, Ev) and lse (..., Hq, L), float32 (float64 for float64 inputs); a
    fully masked row gives 0 and lse -inf. Differentiable to query, key, value and a float mask.
    The caller validates the arguments.
    """
    del enable_gqa  # the head counts say it all: query head h reads KV head h // (Hq // Hkv)
    batch = tuple(torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]))
    Hq, L, E = query.shape[-3:]
    Hkv, S = key.shape[-3], key.shape[-2]
    q = _flatten_batch(query, batch, (Hq, L, E))
    k = _flatten_batch(key, batch, (Hkv, S, E))
    v = _flatten_batch(value, batch, (Hkv, S, value.shape[-1]))
    mask = None if attn_mask is None else _flatten_batch(attn_mask, batch, (Hq, L, S))
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
    out, lse = _attention_op(q, k, v, mask, float(dropout_p), bool(is_causal), float(scale), seed)
    return out.view(*batch, Hq, L, out.shape[-1]), lse.view(*batch, Hq, L)
