"""The CUDA attention's tensor-core data flow, simulated on the CPU (no GPU needed).

A line-by-line Python mirror of the shared-memory swizzle (SwizzledTile), the ldmatrix address
helpers (a_/b_/b_trans_/a_trans_fragment_address in csrc/cuda/attention_device.cuh) and the MMA
loops of csrc/cuda/attention_forward.cuh and attention_backward.cuh, with ldmatrix (.trans) and
mma.m16n8k16 modelled from the PTX ISA's fragment layouts: one warp's S = Q K^T and O = P V, and a
block's S^T = K Q^T, dV = P^T dO, dS^T through shared memory, dQ = dS K must equal the matrix
products. A change to the fragment or address logic of the kernels must be mirrored here.
"""

from __future__ import annotations

import numpy as np
import pytest


def swz(cols, row, col):
    """SwizzledTile<cols>::offset: 16-byte chunks of row r permuted by XOR with r % 8."""
    mask = min(cols // 8, 8) - 1
    return row * cols + (((col >> 3) ^ (row & mask)) << 3) + (col & 7)


def store_tile(matrix):
    rows, cols = matrix.shape
    memory = np.full(rows * cols, np.nan)
    for r in range(rows):
        for c in range(cols):
            assert np.isnan(memory[swz(cols, r, c)])
            memory[swz(cols, r, c)] = matrix[r, c]
    return memory


def ldmatrix(memory, addresses, trans):
    """ldmatrix.x4: lanes 8i..8i+7 address the rows of matrix i; returns [lane][matrix] = (2 values)."""
    out = [[None] * 4 for _ in range(32)]
    for i in range(4):
        m = np.array([memory[addresses[8 * i + j]: addresses[8 * i + j] + 8] for j in range(8)])
        for lane in range(32):
            row, col = lane // 4, 2 * (lane % 4)
            out[lane][i] = (m[col, row], m[col + 1, row]) if trans else (m[row, col], m[row, col + 1])
    return out


def mma(c, a, b0, b1):
    """mma.m16n8k16 row.col: c[lane] (4 floats) += A B from the lanes' fragments."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t:2 * t + 2], A[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        A[g, 2 * t + 8:2 * t + 10], A[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        B[2 * t:2 * t + 2, g], B[2 * t + 8:2 * t + 10, g] = b0[lane], b1[lane]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i, (row, col) in enumerate(((g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1))):
            c[lane][i] += C[row, col]


def a_addr(cols, row0, col0, lane):
    return swz(cols, row0 + lane % 16, col0 + (lane // 16) * 8)


def b_addr(cols, row0, col0, lane):
    return swz(cols, row0 + lane % 8 + (lane // 16) * 8, col0 + ((lane // 8) % 2) * 8)


def bt_addr(cols, row0, col0, lane):
    return swz(cols, row0 + lane % 8 + ((lane // 8) % 2) * 8, col0 + (lane // 16) * 8)


def at_addr(cols, row0, col0, lane):
    return swz(cols, row0 + lane % 8 + (lane // 16) * 8, col0 + ((lane // 8) % 2) * 8)


def load(memory, address, row0, col0, cols, trans):
    return ldmatrix(memory, [address(cols, row0, col0, lane) for lane in range(32)], trans)


def mma_pair(acc, index, a, b):
    """Two n8 tiles from one ldmatrix.x4 of B: registers 0, 1 and 2, 3."""
    mma(acc[index], a, [x[0] for x in b], [x[1] for x in b])
    mma(acc[index + 1], a, [x[2] for x in b], [x[3] for x in b])


def to_matrix(acc):
    m = np.zeros((16, 8 * len(acc)))
    for n, tile in enumerate(acc):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            m[g, n * 8 + 2 * t:n * 8 + 2 * t + 2] = tile[lane][0:2]
            m[g + 8, n * 8 + 2 * t:n * 8 + 2 * t + 2] = tile[lane][2:4]
    return m


def zeros(tiles):
    return [[[0.0] * 4 for _ in range(32)] for _ in range(tiles)]


def a_from_c(acc, kc):
    """The A fragment of a 16 x 16 product from the C fragments of n8 tiles 2kc, 2kc + 1."""
    return [((acc[2 * kc][lane][0], acc[2 * kc][lane][1]), (acc[2 * kc][lane][2], acc[2 * kc][lane][3]),
             (acc[2 * kc + 1][lane][0], acc[2 * kc + 1][lane][1]), (acc[2 * kc + 1][lane][2], acc[2 * kc + 1][lane][3]))
            for lane in range(32)]


rng = np.random.default_rng(0)


def forward(D, block_m, block_n, warp):
    Q, K, V = (rng.standard_normal((rows, D)) for rows in (block_m, block_n, block_n))
    q, k, v = store_tile(Q), store_tile(K), store_tile(V)
    scores = zeros(block_n // 8)
    for kc in range(D // 16):
        a = load(q, a_addr, warp * 16, kc * 16, D, False)
        for n2 in range(block_n // 16):
            mma_pair(scores, 2 * n2, a, load(k, b_addr, n2 * 16, kc * 16, D, False))
    S = to_matrix(scores)
    np.testing.assert_allclose(S, Q[warp * 16:warp * 16 + 16] @ K.T, err_msg="S = Q K^T")
    out = zeros(D // 8)
    for kc in range(block_n // 16):
        for d2 in range(D // 16):
            mma_pair(out, 2 * d2, a_from_c(scores, kc), load(v, bt_addr, kc * 16, d2 * 16, D, True))
    np.testing.assert_allclose(to_matrix(out), S @ V, err_msg="O = P V")


def backward(D, block_m, block_n, pass_dim):
    """One block's backward products; head-dim columns in passes of pass_dim (two passes at D = 256)."""
    Q, K, dO = (rng.standard_normal((rows, D)) for rows in (block_m, block_n, block_m))
    q, k, do = store_tile(Q), store_tile(K), store_tile(dO)
    ds_tile = np.full(block_n * block_m, np.nan)
    ST = np.zeros((block_n, block_m))
    for warp in range(4):
        scores = zeros(block_m // 8)
        for kc in range(D // 16):
            a = load(k, a_addr, warp * 16, kc * 16, D, False)
            for n2 in range(block_m // 16):
                mma_pair(scores, 2 * n2, a, load(q, b_addr, n2 * 16, kc * 16, D, False))
        ST[warp * 16:warp * 16 + 16] = to_matrix(scores)
        np.testing.assert_allclose(ST[warp * 16:warp * 16 + 16], K[warp * 16:warp * 16 + 16] @ Q.T, err_msg="S^T")
        for offset in range(0, D, pass_dim):
            dv = zeros(pass_dim // 8)
            for kc in range(block_m // 16):
                for d2 in range(pass_dim // 16):
                    mma_pair(dv, 2 * d2, a_from_c(scores, kc), load(do, bt_addr, kc * 16, offset + d2 * 16, D, True))
            np.testing.assert_allclose(to_matrix(dv), ST[warp * 16:warp * 16 + 16] @ dO[:, offset:offset + pass_dim],
                                       err_msg="dV = P^T dO")
        for n in range(block_m // 8):  # dS^T (here S^T) to shared memory, as packed pairs
            for r in range(2):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    offset = swz(block_m, warp * 16 + g + 8 * r, n * 8 + 2 * t)
                    ds_tile[offset:offset + 2] = scores[n][lane][2 * r:2 * r + 2]
    assert not np.isnan(ds_tile).any()
    warps_per_row_block = 4 // (block_m // 16)
    dq_tiles = (pass_dim // 8) // warps_per_row_block
    dQ = np.zeros((block_m, D))
    for offset, warp in ((offset, warp) for offset in range(0, D, pass_dim) for warp in range(4)):
        row_block = warp // warps_per_row_block
        for chunk in range(dq_tiles // 4):
            first = offset // 8 + (warp % warps_per_row_block) * dq_tiles + chunk * 4
            acc = zeros(4)
            for kc in range(block_n // 16):
                a = load(ds_tile, at_addr, kc * 16, row_block * 16, block_m, True)
                for d2 in range(2):
                    mma_pair(acc, 2 * d2, a, load(k, bt_addr, kc * 16, (first + 2 * d2) * 8, D, True))
            dQ[row_block * 16:row_block * 16 + 16, first * 8:first * 8 + 32] += to_matrix(acc)
    np.testing.assert_allclose(dQ, ST.T @ K, err_msg="dQ = dS K")


@pytest.mark.parametrize("D, block_n", [(64, 64), (128, 64), (256, 32)])
@pytest.mark.parametrize("warp", [0, 3])
def test_forward_fragments(D, block_n, warp):
    forward(D, 64, block_n, warp)


@pytest.mark.parametrize("D, block_m, pass_dim", [(64, 64, 64), (128, 32, 128), (256, 32, 128)])
def test_backward_fragments(D, block_m, pass_dim):
    backward(D, block_m, 64, pass_dim)


def test_swizzle_is_a_permutation_within_each_row():
    for cols in (32, 64, 128, 256):
        for row in range(16):
            offsets = sorted(swz(cols, row, col) for col in range(cols))
            assert offsets == list(range(row * cols, (row + 1) * cols))
