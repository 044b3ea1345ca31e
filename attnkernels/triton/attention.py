"""The Triton kernels of fused attention, FlashAttention-2 style, and their autotuning configs.

The ops that launch them (``attnkernels::triton_attention`` and its backward) are in ``attention_op``.

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

import os

import triton
import triton.language as tl

from ._sampler import INTERPRETER

# Above this the (BLOCK_M, head dim) tiles no longer fit a GPU's registers in any config.
MAX_HEAD_DIM = 512

# Entries of the per-call parameter vector (in the accumulation dtype, so float64 stays exact).
# Scores are kept in base 2 (log2(e) folded into _SCORE_SCALE), so that each exp is an exp2; with
# an additive float mask they stay natural (the mask is added as given: a mask at the dtype's
# lowest value must stay finite, not overflow to -inf) and the exponents are multiplied by
# _TO_LOG2. _TO_NATURAL and _PER_NATURAL convert scores to natural units (lse) and back.
_SCORE_SCALE = tl.constexpr(0)
_SCALE = tl.constexpr(1)
_KEEP_SCALE = tl.constexpr(2)
_TO_LOG2 = tl.constexpr(3)
_TO_NATURAL = tl.constexpr(4)
_PER_NATURAL = tl.constexpr(5)


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
        shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3),
                  (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 4), (32, 32, 4, 2), (16, 32, 4, 2)]
    else:
        # (32, 128, 4, 5) and (128, 32, 4, 5): the Triton tutorial's Hopper choices for the key-block
        # (dK, dV) and the query-block (dQ) kernel.
        shapes = [(64, 128, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (32, 128, 4, 5), (128, 32, 4, 5),
                  (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)]
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
def _dropout_keep_kernel(Seed, Keep, L, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep: (B * Hq, L, S) uint8, 1 where the attention kernels keep a weight (the same ``_keep``), for
    the double backward, which recomputes attention through the reference with this mask."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(Seed), bh, rows, cols, dropout_p)
    inside = (rows[:, None] < L) & (cols[None, :] < S)
    tl.store(Keep + bh.to(tl.int64) * L * S + rows[:, None] * S + cols[None, :], keep.to(tl.uint8), mask=inside)


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
def _query_block(L, Hq, GROUP, BLOCK_M: tl.constexpr):
    """This program's block of query rows: (start_m, bh, b, h, kv_h, rows). One grid axis (x, up to
    2**31 - 1 programs): query blocks fastest, then batch × head; query head h reads kv head h // GROUP."""
    m_blocks = tl.cdiv(L, BLOCK_M)
    start_m = (tl.program_id(0) % m_blocks) * BLOCK_M
    bh = tl.program_id(0) // m_blocks
    h = bh % Hq
    return start_m, bh, bh // Hq, h, h // GROUP, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _load_query(Q, b, h, rows, e, q_b, q_h, q_l, q_e, L, E, DOT_FP32: tl.constexpr):
    """The (rows, e) query tile of head h of batch entry b as a tl.dot operand, zero past L and E."""
    q = tl.load(Q + b.to(tl.int64) * q_b + h * q_h + rows[:, None] * q_l + e[None, :] * q_e,
                mask=(rows[:, None] < L) & (e[None, :] < E), other=0)
    return _operand(q, DOT_FP32)


@triton.jit
def _scores(q, k_t, mask_ptr, rows, cols, L, S, m_l, m_s, params_ptr,
            HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
            ACC: tl.constexpr, BOUNDED: tl.constexpr = True):
    """The (BLOCK_M, BLOCK_N) scores q kᵀ · scale (+ mask) in the units of _SCORE_SCALE, -inf where
    masked, causal (column > row) or out of range. BOUNDED=False: the caller knows every column is
    inside S and left of the diagonal for every row, so only the attention mask applies (and
    IS_CAUSAL has nothing left to mask)."""
    s = tl.dot(q, k_t, input_precision=PRECISION, out_dtype=ACC) * tl.load(params_ptr + _SCORE_SCALE)
    if HAS_MASK:
        inside = rows[:, None] < L
        if BOUNDED:
            inside = inside & (cols[None, :] < S)
        tile = tl.load(mask_ptr + rows[:, None] * m_l + cols[None, :] * m_s, mask=inside, other=0)
        if MASK_BOOL:
            s = tl.where(tile != 0, s, s + float("-inf"))  # added, as torch: a NaN or +inf score stays NaN
        else:
            s += tile.to(ACC)
    if BOUNDED:
        keep = cols[None, :] < S
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _exp2_of_difference(s, shift, params_ptr, NATURAL: tl.constexpr):
    """2^(s - shift) for scores in base 2; exp(s - shift) for natural ones (the difference first,
    so that two scores near the dtype's lowest value do not overflow)."""
    if NATURAL:
        return tl.exp2((s - shift) * tl.load(params_ptr + _TO_LOG2))
    return tl.exp2(s - shift)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _forward_block(acc, row_sum, row_max, q, k_base, v_base, mask_base, params_ptr, seed, bh, rows, start_n, e, ev,
                   k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p, DTYPE: tl.constexpr, BOUNDED: tl.constexpr,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """One key block of the online softmax: the updated (acc, row_sum, row_max). BOUNDED: the block
    may reach past S or right of the causal diagonal, so columns are masked; a block every row sees
    whole skips those masks (the attention mask, if any, still applies)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if BOUNDED:
        k_t = tl.load(k_base + cols[None, :] * k_s + e[:, None] * k_e,
                      mask=(cols[None, :] < S) & (e[:, None] < E), other=0)
    else:
        k_t = tl.load(k_base + cols[None, :] * k_s + e[:, None] * k_e, mask=e[:, None] < E, other=0)
    k_t = _operand(k_t, DOT_FP32)
    s = _scores(q, k_t, mask_base, rows, cols, L, S, m_l, m_s, params_ptr,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC, BOUNDED)
    new_max = tl.maximum(row_max, tl.max(s, 1))
    # A row masked so far keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = _exp2_of_difference(s, shift[:, None], params_ptr, HAS_MASK and not MASK_BOOL)
    rescale = _exp2_of_difference(row_max, shift, params_ptr, HAS_MASK and not MASK_BOOL)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_keep(seed, bh, rows, cols, dropout_p), p, 0.0)
    if BOUNDED:
        v = tl.load(v_base + cols[:, None] * v_s + ev[None, :] * v_e,
                    mask=(cols[:, None] < S) & (ev[None, :] < EV), other=0)
    else:
        v = tl.load(v_base + cols[:, None] * v_s + ev[None, :] * v_e, mask=ev[None, :] < EV, other=0)
    v = _operand(v, DOT_FP32)
    weights = _rounded(p, DTYPE, DOT_FP32)
    acc = acc * rescale[:, None] + tl.dot(weights, v, input_precision=PRECISION, out_dtype=ACC)
    return acc, row_sum, new_max


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
    start_m, bh, b, h, kv_h, rows = _query_block(L, Hq, GROUP, BLOCK_M)
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    q = _load_query(Q, b, h, rows, e, q_b, q_h, q_l, q_e, L, E, DOT_FP32)
    k_base = K + b.to(tl.int64) * k_b + kv_h * k_h
    v_base = V + b.to(tl.int64) * v_b + kv_h * v_h
    mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
    row_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_EV), ACC)
    seed = tl.load(Seed) if HAS_DROPOUT else 0
    # Key blocks every row of this block sees whole (inside S, left of the causal diagonal) run
    # without the bounds and causal masks; the blocks after them, up to the end, with them.
    end_n = S
    full_end = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        end_n = tl.minimum(S, start_m + BLOCK_M)  # blocks right of the diagonal are skipped
        full_end = tl.minimum(full_end, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _forward_block(
            acc, row_sum, row_max, q, k_base, v_base, mask_base, Params, seed, bh, rows, start_n, e, ev,
            k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, False,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, PRECISION, DOT_FP32, ACC, BLOCK_N)
    for start_n in range(full_end, end_n, BLOCK_N):
        acc, row_sum, row_max = _forward_block(
            acc, row_sum, row_max, q, k_base, v_base, mask_base, Params, seed, bh, rows, start_n, e, ev,
            k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, True,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, PRECISION, DOT_FP32, ACC, BLOCK_N)
    empty = row_sum == 0  # every column masked: output 0, log-sum-exp -inf
    inverse = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, row_sum))
    if HAS_DROPOUT:
        inverse = inverse * tl.load(Params + _KEEP_SCALE)
    out = acc * inverse[:, None]
    out_base = Out + bh.to(tl.int64) * L * EV
    tl.store(out_base + rows[:, None] * EV + ev[None, :], out, mask=(rows[:, None] < L) & (ev[None, :] < EV))
    natural_max = row_max * tl.load(Params + _TO_NATURAL)
    lse = tl.where(empty, float("-inf"), natural_max + tl.log(tl.where(empty, 1.0, row_sum)))
    tl.store(Lse + bh.to(tl.int64) * L + rows, lse, mask=rows < L)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _probabilities(s, lse, params_ptr, NATURAL: tl.constexpr):
    """exp(s - lse), lse in score units, with rows past the end or fully masked (lse = +inf here)
    giving 0."""
    return _exp2_of_difference(s, lse[:, None], params_ptr, NATURAL)


@triton.jit
def _score_lse(lse, params_ptr):
    """The natural log-sum-exp in score units, fully masked rows (-inf) as +inf."""
    return tl.where(lse == float("-inf"), float("inf"), lse * tl.load(params_ptr + _PER_NATURAL))


@triton.jit
def _backward_kv_block(grad_k, grad_v, q_base, o_base, mask_base, lse_ptr, delta_ptr, params_ptr, seed, keep_scale, bh,
                       start_m, cols, e, ev, k, k_t, v_t, q_l, q_e, o_l, o_e, m_l, m_s, L, S, E, EV, dropout_p,
                       DTYPE: tl.constexpr, BOUNDED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query block's share of dK and dV for this key block: the updated (grad_k, grad_v).
    BOUNDED=False: every column is inside S and left of the diagonal for every row of the block."""
    rows = start_m + tl.arange(0, BLOCK_M)
    in_rows = rows < L
    q = tl.load(q_base + rows[:, None] * q_l + e[None, :] * q_e, mask=in_rows[:, None] & (e[None, :] < E), other=0)
    q = _operand(q, DOT_FP32)
    grad_out = tl.load(o_base + rows[:, None] * o_l + ev[None, :] * o_e,
                       mask=in_rows[:, None] & (ev[None, :] < EV), other=0)
    grad_out = _operand(grad_out, DOT_FP32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=in_rows, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=in_rows, other=0)
    s = _scores(q, k_t, mask_base, rows, cols, L, S, m_l, m_s, params_ptr,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC, BOUNDED)
    p = _probabilities(s, _score_lse(lse, params_ptr), params_ptr, HAS_MASK and not MASK_BOOL)
    grad_p = tl.dot(grad_out, v_t, input_precision=PRECISION, out_dtype=ACC)
    if HAS_DROPOUT:
        keep = _keep(seed, bh, rows, cols, dropout_p)
        p_dropped = tl.where(keep, p * keep_scale, 0.0)
        grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
    else:
        p_dropped = p
    weights = _rounded(p_dropped, DTYPE, DOT_FP32)
    grad_v += tl.dot(tl.trans(weights), grad_out, input_precision=PRECISION, out_dtype=ACC)
    grad_s = p * (grad_p - delta[:, None])
    grad_scores = _rounded(grad_s, DTYPE, DOT_FP32)
    grad_k += tl.dot(tl.trans(grad_scores), q, input_precision=PRECISION, out_dtype=ACC)
    return grad_k, grad_v


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
    seed = tl.load(Seed) if HAS_DROPOUT else 0
    keep_scale = tl.load(Params + _KEEP_SCALE) if HAS_DROPOUT else 1.0
    begin_m = 0
    # Query blocks before split_m run with the bounds and causal masks, the rest without: with every
    # column of this block inside S, a query block past the diagonal (its first row at or after the
    # last column) sees all of them. Rows past L add nothing either way (their lse is +inf).
    split_m = 0
    if IS_CAUSAL:
        begin_m = (start_n // BLOCK_M) * BLOCK_M  # rows above the diagonal never see these columns
        split_m = tl.minimum(L, tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M)
    if start_n + BLOCK_N > S:
        split_m = L
    for h in range(kv_h * GROUP, kv_h * GROUP + GROUP):
        bh = b * Hq + h
        q_base = Q + b.to(tl.int64) * q_b + h * q_h
        o_base = GradOut + b.to(tl.int64) * o_b + h * o_h
        mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
        for start_m in range(begin_m, split_m, BLOCK_M):
            grad_k, grad_v = _backward_kv_block(
                grad_k, grad_v, q_base, o_base, mask_base, Lse, Delta, Params, seed, keep_scale, bh, start_m, cols,
                e, ev, k, k_t, v_t, q_l, q_e, o_l, o_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, True,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, PRECISION, DOT_FP32, ACC, BLOCK_M)
        for start_m in range(split_m, L, BLOCK_M):
            grad_k, grad_v = _backward_kv_block(
                grad_k, grad_v, q_base, o_base, mask_base, Lse, Delta, Params, seed, keep_scale, bh, start_m, cols,
                e, ev, k, k_t, v_t, q_l, q_e, o_l, o_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, False,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, PRECISION, DOT_FP32, ACC, BLOCK_M)
    grad_k = grad_k * tl.load(Params + _SCALE)
    out_rows = bkv.to(tl.int64) * S + cols
    tl.store(GradK + out_rows[:, None] * E + e[None, :], grad_k, mask=(cols[:, None] < S) & (e[None, :] < E))
    tl.store(GradV + out_rows[:, None] * EV + ev[None, :], grad_v, mask=(cols[:, None] < S) & (ev[None, :] < EV))


@triton.jit
def _backward_q_block(grad_q, q, grad_out, lse, delta, k_base, v_base, mask_base, grad_mask_ptr, params_ptr, seed,
                      keep_scale, bh, rows, start_n, e, ev, k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p,
                      DTYPE: tl.constexpr, BOUNDED: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                      IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                      PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block's share of dQ (and, with MASK_GRAD, its tile of the score gradient): the updated
    grad_q. BOUNDED=False: every column is inside S and left of the diagonal for every row."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if BOUNDED:
        k = tl.load(k_base + cols[:, None] * k_s + e[None, :] * k_e, mask=(cols[:, None] < S) & (e[None, :] < E),
                    other=0)
        v_t = tl.load(v_base + cols[None, :] * v_s + ev[:, None] * v_e,
                      mask=(cols[None, :] < S) & (ev[:, None] < EV), other=0)
    else:
        k = tl.load(k_base + cols[:, None] * k_s + e[None, :] * k_e, mask=e[None, :] < E, other=0)
        v_t = tl.load(v_base + cols[None, :] * v_s + ev[:, None] * v_e, mask=ev[:, None] < EV, other=0)
    k = _operand(k, DOT_FP32)
    v_t = _operand(v_t, DOT_FP32)
    s = _scores(q, tl.trans(k), mask_base, rows, cols, L, S, m_l, m_s, params_ptr,
                HAS_MASK, MASK_BOOL, IS_CAUSAL, PRECISION, ACC, BOUNDED)
    p = _probabilities(s, lse, params_ptr, HAS_MASK and not MASK_BOOL)
    grad_p = tl.dot(grad_out, v_t, input_precision=PRECISION, out_dtype=ACC)
    if HAS_DROPOUT:
        keep = _keep(seed, bh, rows, cols, dropout_p)
        grad_p = tl.where(keep, grad_p * keep_scale, 0.0)
    grad_s = p * (grad_p - delta[:, None])
    grad_scores = _rounded(grad_s, DTYPE, DOT_FP32)
    grad_q += tl.dot(grad_scores, k, input_precision=PRECISION, out_dtype=ACC)
    if MASK_GRAD:
        tl.store(grad_mask_ptr + (bh.to(tl.int64) * L + rows[:, None]) * S + cols[None, :], grad_s,
                 mask=(rows[:, None] < L) & (cols[None, :] < S))
    return grad_q


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
    start_m, bh, b, h, kv_h, rows = _query_block(L, Hq, GROUP, BLOCK_M)
    in_rows = rows < L
    e = tl.arange(0, BLOCK_E)
    ev = tl.arange(0, BLOCK_EV)
    q = _load_query(Q, b, h, rows, e, q_b, q_h, q_l, q_e, L, E, DOT_FP32)
    grad_out = tl.load(GradOut + b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_l + ev[None, :] * o_e,
                       mask=in_rows[:, None] & (ev[None, :] < EV), other=0)
    grad_out = _operand(grad_out, DOT_FP32)
    lse = tl.load(Lse + bh.to(tl.int64) * L + rows, mask=in_rows, other=float("inf"))
    lse = _score_lse(lse, Params)
    delta = tl.load(Delta + bh.to(tl.int64) * L + rows, mask=in_rows, other=0)
    k_base = K + b.to(tl.int64) * k_b + kv_h * k_h
    v_base = V + b.to(tl.int64) * v_b + kv_h * v_h
    mask_base = Mask + b.to(tl.int64) * m_b + h * m_h
    grad_q = tl.zeros((BLOCK_M, BLOCK_E), ACC)
    seed = tl.load(Seed) if HAS_DROPOUT else 0
    keep_scale = tl.load(Params + _KEEP_SCALE) if HAS_DROPOUT else 1.0
    end_n = S
    full_end = (S // BLOCK_N) * BLOCK_N  # as in the forward: whole blocks without masks first
    if IS_CAUSAL:
        end_n = tl.minimum(S, start_m + BLOCK_M)
        full_end = tl.minimum(full_end, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        grad_q = _backward_q_block(
            grad_q, q, grad_out, lse, delta, k_base, v_base, mask_base, GradMask, Params, seed, keep_scale, bh,
            rows, start_n, e, ev, k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, False,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, MASK_GRAD, PRECISION, DOT_FP32, ACC, BLOCK_N)
    for start_n in range(full_end, end_n, BLOCK_N):
        grad_q = _backward_q_block(
            grad_q, q, grad_out, lse, delta, k_base, v_base, mask_base, GradMask, Params, seed, keep_scale, bh,
            rows, start_n, e, ev, k_s, k_e, v_s, v_e, m_l, m_s, L, S, E, EV, dropout_p, Q.dtype.element_ty, True,
            HAS_MASK, MASK_BOOL, IS_CAUSAL, HAS_DROPOUT, MASK_GRAD, PRECISION, DOT_FP32, ACC, BLOCK_N)
    grad_q = grad_q * tl.load(Params + _SCALE)
    tl.store(GradQ + (bh.to(tl.int64) * L + rows[:, None]) * E + e[None, :], grad_q,
             mask=in_rows[:, None] & (e[None, :] < E))
