// Forward kernel of the CUDA fused attention (FlashAttention-2 algorithm).
//
// A block of 4 warps owns 64 queries of one (batch, query head); each warp
// owns 16 of them. Keys and values stream through shared memory block_n rows
// at a time, the next tile copied (cp.async) while the current one is used.
// Per tile: S = Q K^T on tensor cores, scaled into base 2 (scale * log2 e
// folded into one multiply), masked, then the online softmax in registers
// (row maximum across the 4 lanes that share a row), P = exp2(S - max),
// dropout on P, O += P V with P fed from registers. Written once at the end:
// O / rowsum and lse = (max + log2 rowsum) * ln 2.
#pragma once

#include <cuda_runtime_api.h>

#include "attention_device.cuh"

namespace attnkernels {
namespace cuda_attention {

template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const AttentionParams& p, T* k_tile, T* v_tile, const T* k_head,
                                             const T* v_head, int col0) {
  constexpr int kBlockN = forward_tile(D).block_n;
  load_tile_async<kBlockN, D>(k_tile, k_head + col0 * p.k_stride_s, p.k_stride_s, p.S - col0, p.E);
  load_tile_async<kBlockN, D>(v_tile, v_head + col0 * p.v_stride_s, p.v_stride_s, p.S - col0, p.Ev);
}

// kMaskOrDropout: false compiles the plain kernel (no mask, no dropout) that
// most calls run, without the registers the mask and dropout paths hold.
template <typename T, int D, bool kMaskOrDropout>
__global__ void __launch_bounds__(kThreads, forward_blocks_per_sm(D))
    attention_forward_kernel(const AttentionParams p) {
  constexpr int kBlockM = forward_tile(D).block_m;
  constexpr int kBlockN = forward_tile(D).block_n;
  constexpr int kScoreTiles = kBlockN / 8;  // n8 tiles of S per warp
  constexpr int kOutTiles = D / 8;          // n8 tiles of O per warp
  static_assert(kBlockM == 16 * (kThreads / 32), "one m16 row block per warp");

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* q_tile = reinterpret_cast<T*>(shared_bytes);
  T* k_tiles = q_tile + kBlockM * D;        // two buffers of kBlockN x D
  T* v_tiles = k_tiles + 2 * kBlockN * D;   // two buffers of kBlockN x D

  // Longest-first under causal masking: the last query blocks see the most keys.
  const int query_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int kv_head = h / p.group;
  const int64_t bh = static_cast<int64_t>(b) * p.q_heads + h;
  const int row0 = query_block * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const T* q_head = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + kv_head * p.k_stride_h;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + kv_head * p.v_stride_h;

  const int key_end = p.causal ? static_cast<int>(causal_key_end(row0, kBlockM, p.S)) : p.S;
  const int key_tiles = static_cast<int>(ceil_div(key_end, kBlockN));

  load_tile_async<kBlockM, D>(q_tile, q_head + row0 * p.q_stride_l, p.q_stride_l, p.L - row0, p.E);
  if (key_tiles > 0) load_kv_tile<T, D>(p, k_tiles, v_tiles, k_head, v_head, 0);
  cp_async_commit();

  // This thread's two rows of every fragment: g and g + 8 of the warp's 16.
  const int rows[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
  float out[kOutTiles][4];
#pragma unroll
  for (int i = 0; i < kOutTiles; ++i) out[i][0] = out[i][1] = out[i][2] = out[i][3] = 0.0f;
  float row_max[2] = {negative_infinity(), negative_infinity()};  // base 2
  float row_sum[2] = {0.0f, 0.0f};  // this thread's share; the 4 lanes of a row are summed at the end

  for (int tile = 0; tile < key_tiles; ++tile) {
    cp_async_wait_all();
    __syncthreads();  // tile `tile` has landed, and every warp is done with tile - 1's buffers
    if (tile + 1 < key_tiles) {
      const int next = (tile + 1) & 1;
      load_kv_tile<T, D>(p, k_tiles + next * kBlockN * D, v_tiles + next * kBlockN * D, k_head, v_head,
                         (tile + 1) * kBlockN);
    }
    cp_async_commit();
    const T* k_tile = k_tiles + (tile & 1) * kBlockN * D;
    const T* v_tile = v_tiles + (tile & 1) * kBlockN * D;
    const int col0 = tile * kBlockN;

    // S = Q K^T for the warp's 16 rows x kBlockN keys.
    float scores[kScoreTiles][4];
#pragma unroll
    for (int i = 0; i < kScoreTiles; ++i) scores[i][0] = scores[i][1] = scores[i][2] = scores[i][3] = 0.0f;
#pragma unroll 2  // not fully: ptxas would hoist every ldmatrix and run out of registers
    for (int kc = 0; kc < D / 16; ++kc) {
      uint32_t a[4];
      ldmatrix_x4(a, a_fragment_address<D>(q_tile, warp * 16, kc * 16, lane));
#pragma unroll
      for (int n2 = 0; n2 < kScoreTiles / 2; ++n2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, b_fragment_address<D>(k_tile, n2 * 16, kc * 16, lane));
        mma_16816<T>(scores[2 * n2], a, bk[0], bk[1]);
        mma_16816<T>(scores[2 * n2 + 1], a, bk[2], bk[3]);
      }
    }

    // Scale into base 2, then causal, bounds and the attention mask.
    const bool needs_bounds = col0 + kBlockN > p.S || (p.causal && col0 + kBlockN > row0 + 1);
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = rows[i / 2], col = col0 + n * 8 + 2 * t + (i % 2);
        float x = scores[n][i] * p.scale_log2;
        if (needs_bounds && (col >= p.S || (p.causal && col > row))) {
          x = negative_infinity();
        } else if (kMaskOrDropout && p.mask != nullptr && row < p.L) {
          x += mask_term(p, b, h, row, col);
        }
        scores[n][i] = x;
      }
    }

    // Online softmax. A row's maximum may stay -inf (every key so far masked):
    // exponents then use 0 instead, so that -inf - -inf never makes a NaN.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = negative_infinity();
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) tile_max = fmaxf(tile_max, fmaxf(scores[n][2 * r], scores[n][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      const float shift = new_max == negative_infinity() ? 0.0f : new_max;
      const float correction = exp2f(row_max[r] - shift);
      row_max[r] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
        scores[n][2 * r] = exp2f(scores[n][2 * r] - shift);
        scores[n][2 * r + 1] = exp2f(scores[n][2 * r + 1] - shift);
        sum += scores[n][2 * r] + scores[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * correction + sum;
#pragma unroll
      for (int d = 0; d < kOutTiles; ++d) {
        out[d][2 * r] *= correction;
        out[d][2 * r + 1] *= correction;
      }
    }

    // P V runs on every visible tile, also one the mask hides from all the warp's rows: torch multiplies
    // those zero probabilities by V too, so a NaN value behind the mask reaches every row, as in torch.

    // Dropout acts on the probabilities that multiply V, not on the row sums.
    if (kMaskOrDropout && p.dropout) {
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = rows[i / 2], col = col0 + n * 8 + 2 * t + (i % 2);
          const bool keep = dropout_keep(p.dropout_key, p.dropout_threshold, attention_element(p, bh, row, col));
          scores[n][i] = keep ? scores[n][i] * p.keep_scale : 0.0f;
        }
      }
    }

    // O += P V: P's C fragments are the A fragments of the product.
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      const uint32_t a[4] = {pack2<T>(scores[2 * kc][0], scores[2 * kc][1]),
                             pack2<T>(scores[2 * kc][2], scores[2 * kc][3]),
                             pack2<T>(scores[2 * kc + 1][0], scores[2 * kc + 1][1]),
                             pack2<T>(scores[2 * kc + 1][2], scores[2 * kc + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < kOutTiles / 2; ++d2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, b_trans_fragment_address<D>(v_tile, kc * 16, d2 * 16, lane));
        mma_16816<T>(out[2 * d2], a, bv[0], bv[1]);
        mma_16816<T>(out[2 * d2 + 1], a, bv[2], bv[3]);
      }
    }
  }

  cp_async_wait_all();  // (no tile left in flight when the block exits: none when every key is masked)

  // Epilogue: a row that attends to nothing (sum 0) gives 0 and lse -inf; a NaN sum gives NaN
  // output and lse, as torch does (NaN > 0 is false, so the test is sum == 0, not sum > 0).
  T* out_head = static_cast<T*>(p.out) + bh * p.L * p.Ev;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool attended = !(sum == 0.0f);
    const float inverse = attended ? 1.0f / sum : 0.0f;
    const int row = rows[r];
    if (row >= p.L) continue;
    T* out_row = out_head + static_cast<int64_t>(row) * p.Ev;
#pragma unroll
    for (int d = 0; d < kOutTiles; ++d) {
      const int col = d * 8 + 2 * t;
      if (col < p.Ev) {
        *reinterpret_cast<uint32_t*>(out_row + col) = pack2<T>(out[d][2 * r] * inverse, out[d][2 * r + 1] * inverse);
      }
    }
    if (t == 0) p.lse[bh * p.L + row] = attended ? (row_max[r] + log2f(sum)) * kLn2 : negative_infinity();
  }
}

template <typename T, int D>
void run_attention_forward(const AttentionParams& p, cudaStream_t stream) {
  const LaunchGrid grid = forward_grid(p.batch, p.q_heads, p.L, D);
  constexpr int kSharedBytes = forward_smem_bytes(D);
  const bool general = p.mask != nullptr || p.dropout;
  auto kernel = general ? attention_forward_kernel<T, D, true> : attention_forward_kernel<T, D, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
  kernel<<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)),
           kThreads, kSharedBytes, stream>>>(p);
}

}  // namespace cuda_attention
}  // namespace attnkernels
