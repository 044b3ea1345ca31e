// Backward kernels of the CUDA fused attention (FlashAttention-2 algorithm).
//
// Preprocess: delta = rowsum(dO * O) - dlse, one warp per query row.
//
// Main kernel: a block of 4 warps owns 64 keys of one (batch, kv head); each
// warp owns 16 of them, whose dK and dV accumulate in registers over every
// query block of every query head that reads this kv head (GQA). Q and dO
// tiles stream through double-buffered shared memory. Per query block, in the
// transposed (keys x queries) orientation so that each warp's rows are its keys:
//   S^T = K Q^T, P^T = exp2(S^T * scale log2 e + mask - lse log2 e)
//   dP^T = V dO^T, dS^T = P^T * (dP^T [dropped] - delta)
//   dV += P^T [dropped] dO, dK += dS^T Q (scaled at the end)
//   dQ += scale * dS K, through shared memory (dS^T) and fp32 atomics.
// Deterministic mode: one block per (batch, kv head) runs the key blocks in
// order, so every dQ element is accumulated by one thread in a fixed order.
// Head dims above 128: dK and dV of 16 keys x 256 do not fit in registers, so
// the kernel runs twice, each pass accumulating dK, dV and dQ for one half of
// the head-dim columns (kDimOffset) and recomputing S^T and dP^T.
#pragma once

#include <cuda_runtime_api.h>

#include "attention_device.cuh"

namespace attnkernels {
namespace cuda_attention {

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_backward_preprocess_kernel(const T* grad_out, const T* out,
                                                                                  const float* grad_lse, float* delta,
                                                                                  int64_t rows, int width) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float sum = 0.0f;
  for (int e = lane; e < width; e += 32) {
    sum += to_float(grad_out[row * width + e]) * to_float(out[row * width + e]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) delta[row] = sum - (grad_lse != nullptr ? grad_lse[row] : 0.0f);
}

template <typename T>
void run_attention_backward_preprocess(const T* grad_out, const T* out, const float* grad_lse, float* delta,
                                       int64_t rows, int width, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kRowsPerBlock));
  attention_backward_preprocess_kernel<T><<<blocks, kThreads, 0, stream>>>(grad_out, out, grad_lse, delta, rows, width);
}

template <typename T, int D>
__device__ __forceinline__ void load_query_tiles(const AttentionParams& p, T* q_tile, T* do_tile, int b, int h,
                                                 int row0) {
  constexpr int kBlockM = backward_tile(D).block_m;
  const T* q_rows = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + row0 * p.q_stride_l;
  const int64_t bh = static_cast<int64_t>(b) * p.q_heads + h;
  const T* do_rows = static_cast<const T*>(p.grad_out) + (bh * p.L + row0) * p.Ev;
  load_tile_async<kBlockM, D>(q_tile, q_rows, p.q_stride_l, p.L - row0, p.E);
  load_tile_async<kBlockM, D>(do_tile, do_rows, p.Ev, p.L - row0, p.Ev);
}

// kGeneral: false compiles the plain kernel (no mask, dropout or mask
// gradient) that most calls run, without the registers those paths hold.
// kDimOffset: the first head-dim column of this pass (a constant: fewer live
// address registers).
template <typename T, int D, bool kGeneral, int kDimOffset>
__global__ void __launch_bounds__(kThreads, backward_blocks_per_sm(D))
    attention_backward_kernel(const AttentionParams p) {
  constexpr int kBlockM = backward_tile(D).block_m;  // queries per step
  constexpr int kBlockN = backward_tile(D).block_n;  // keys per block
  constexpr int kQueryTiles = kBlockM / 8;           // n8 tiles of S^T per warp
  constexpr int kPassDim = backward_pass_dim(D);     // head-dim columns of dK, dV, dQ per pass
  constexpr int kDimTiles = kPassDim / 8;            // n8 tiles of dK, dV per warp
  // dQ (kBlockM x D) is shared out: kWarpsPerRowBlock warps per m16 row block,
  // each with kDqTiles n8 tiles of the head dim.
  constexpr int kWarpsPerRowBlock = (kThreads / 32) / (kBlockM / 16);
  constexpr int kDqTiles = kDimTiles / kWarpsPerRowBlock;
  constexpr int kDqChunk = 4;
  static_assert(kBlockN == 16 * (kThreads / 32), "one m16 block of keys per warp");
  static_assert(kWarpsPerRowBlock >= 1 && kDqTiles % kDqChunk == 0, "dQ split into chunks of 4 n8 tiles");

  extern __shared__ __align__(128) unsigned char shared_bytes[];
  T* k_tile = reinterpret_cast<T*>(shared_bytes);
  T* v_tile = k_tile + kBlockN * D;
  T* q_tiles = v_tile + kBlockN * D;          // two buffers of kBlockM x D
  T* do_tiles = q_tiles + 2 * kBlockM * D;    // two buffers of kBlockM x D
  T* ds_tile = do_tiles + 2 * kBlockM * D;    // kBlockN x kBlockM, dS^T

  const int kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int key_blocks = static_cast<int>(ceil_div(p.S, kBlockN));
  const int query_blocks = static_cast<int>(ceil_div(p.L, kBlockM));
  const T* k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + kv_head * p.k_stride_h;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + kv_head * p.v_stride_h;
  const int64_t kv_index = static_cast<int64_t>(b) * p.kv_heads + kv_head;

  for (int key_block = blockIdx.x; key_block < key_blocks; key_block += gridDim.x) {
    const int col0 = key_block * kBlockN;
    __syncthreads();  // the previous key block is done with every tile
    load_tile_async<kBlockN, D>(k_tile, k_head + col0 * p.k_stride_s, p.k_stride_s, p.S - col0, p.E);
    load_tile_async<kBlockN, D>(v_tile, v_head + col0 * p.v_stride_s, p.v_stride_s, p.S - col0, p.Ev);

    const int first_query_block = p.causal ? static_cast<int>(causal_first_query_block(col0, kBlockM)) : 0;
    const int blocks_per_head = query_blocks > first_query_block ? query_blocks - first_query_block : 0;
    const int steps = blocks_per_head * p.group;
    if (steps > 0) {
      load_query_tiles<T, D>(p, q_tiles, do_tiles, b, kv_head * p.group, first_query_block * kBlockM);
    }
    cp_async_commit();

    const int keys[2] = {col0 + warp * 16 + g, col0 + warp * 16 + g + 8};
    float dk[kDimTiles][4], dv[kDimTiles][4];
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) {
      dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.0f;
      dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.0f;
    }

    // Steps run over (query head of the group, query block), query blocks
    // innermost; (h, row0) is this step's, (next_h, next_row0) the prefetched one.
    const int first_row0 = first_query_block * kBlockM;
    int h = kv_head * p.group, next_h = h;
    int row0 = first_row0, next_row0 = first_row0;
    for (int step = 0; step < steps; ++step) {
      h = next_h;
      row0 = next_row0;
      next_row0 += kBlockM;
      if (next_row0 >= p.L) {
        next_row0 = first_row0;
        ++next_h;
      }
      const int64_t bh = static_cast<int64_t>(b) * p.q_heads + h;
      cp_async_wait_all();
      __syncthreads();  // this step's tiles have landed; the previous step is done with the other buffers
      if (step + 1 < steps) {
        const int next = (step + 1) & 1;
        load_query_tiles<T, D>(p, q_tiles + next * kBlockM * D, do_tiles + next * kBlockM * D, b, next_h, next_row0);
      }
      cp_async_commit();
      const T* q_tile = q_tiles + (step & 1) * kBlockM * D;
      const T* do_tile = do_tiles + (step & 1) * kBlockM * D;

      // S^T = K Q^T and dP^T = V dO^T, the warp's 16 keys x kBlockM queries.
      float scores[kQueryTiles][4], grads[kQueryTiles][4];
#pragma unroll
      for (int i = 0; i < kQueryTiles; ++i) {
        scores[i][0] = scores[i][1] = scores[i][2] = scores[i][3] = 0.0f;
        grads[i][0] = grads[i][1] = grads[i][2] = grads[i][3] = 0.0f;
      }
#pragma unroll 1  // a rolled loop: unrolled, ptxas keeps every ldmatrix address live and spills
      for (int kc = 0; kc < D / 16; ++kc) {
        uint32_t ak[4];
        ldmatrix_x4(ak, a_fragment_address<D>(k_tile, warp * 16, kc * 16, lane));
#pragma unroll
        for (int n2 = 0; n2 < kQueryTiles / 2; ++n2) {
          uint32_t bq[4];
          ldmatrix_x4(bq, b_fragment_address<D>(q_tile, n2 * 16, kc * 16, lane));
          mma_16816<T>(scores[2 * n2], ak, bq[0], bq[1]);
          mma_16816<T>(scores[2 * n2 + 1], ak, bq[2], bq[3]);
        }
      }
#pragma unroll 1
      for (int kc = 0; kc < D / 16; ++kc) {
        uint32_t av[4];
        ldmatrix_x4(av, a_fragment_address<D>(v_tile, warp * 16, kc * 16, lane));
#pragma unroll
        for (int n2 = 0; n2 < kQueryTiles / 2; ++n2) {
          uint32_t bo[4];
          ldmatrix_x4(bo, b_fragment_address<D>(do_tile, n2 * 16, kc * 16, lane));
          mma_16816<T>(grads[2 * n2], av, bo[0], bo[1]);
          mma_16816<T>(grads[2 * n2 + 1], av, bo[2], bo[3]);
        }
      }

      // P^T from the saved lse; dS^T = P^T (dP^T - delta), dropout on both
      // dP^T and the P^T that multiplies dO. Both leave as packed 16-bit pairs
      // [n8 tile][row g or g + 8], the halves of the A fragments of dV and dK.
      uint32_t probs[kQueryTiles][2], grad_scores[kQueryTiles][2];
      const float* lse_rows = p.lse_in + bh * p.L;
      const float* delta_rows = p.delta + bh * p.L;
#pragma unroll
      for (int n = 0; n < kQueryTiles; ++n) {
        float prob_pair[2][2], grad_pair[2][2];  // [row g, g + 8][query column]
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int query = row0 + n * 8 + 2 * t + c;
          // Queries past L, and fully masked rows (lse -inf), have no gradient.
          const float row_lse = query < p.L ? lse_rows[query] * kLog2e : negative_infinity();
          const float row_delta = query < p.L ? delta_rows[query] : 0.0f;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key = keys[r];
            const bool visible = row_lse != negative_infinity() && key < p.S && !(p.causal && key > query);
            float x = scores[n][2 * r + c] * p.scale_log2;
            if (kGeneral && visible && p.mask != nullptr) x += mask_term(p, b, h, query, key);
            const float prob = visible ? exp2f(x - row_lse) : 0.0f;
            float grad_prob = grads[n][2 * r + c];
            float dropped_prob = prob;
            if (kGeneral && p.dropout) {
              const bool keep =
                  dropout_keep(p.dropout_key, p.dropout_threshold, attention_element(p, bh, query, key));
              grad_prob = keep ? grad_prob * p.keep_scale : 0.0f;
              dropped_prob = keep ? prob * p.keep_scale : 0.0f;
            }
            const float grad_score = prob * (grad_prob - row_delta);
            if (kGeneral && p.grad_mask != nullptr && query < p.L && key < p.S) {
              p.grad_mask[(bh * p.L + query) * p.S + key] = grad_score;
            }
            prob_pair[r][c] = dropped_prob;
            grad_pair[r][c] = grad_score;
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          probs[n][r] = pack2<T>(prob_pair[r][0], prob_pair[r][1]);
          grad_scores[n][r] = pack2<T>(grad_pair[r][0], grad_pair[r][1]);
        }
      }

      // dS^T to shared memory: dQ needs it with the queries as rows.
#pragma unroll
      for (int n = 0; n < kQueryTiles; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key_row = warp * 16 + g + 8 * r, query_col = n * 8 + 2 * t;
          *reinterpret_cast<uint32_t*>(ds_tile + SwizzledTile<kBlockM>::offset(key_row, query_col)) =
              grad_scores[n][r];
        }
      }

      // dV += P^T dO and dK += dS^T Q.
#pragma unroll
      for (int kc = 0; kc < kBlockM / 16; ++kc) {
        const uint32_t ap[4] = {probs[2 * kc][0], probs[2 * kc][1], probs[2 * kc + 1][0], probs[2 * kc + 1][1]};
#pragma unroll
        for (int d2 = 0; d2 < kDimTiles / 2; ++d2) {
          uint32_t bo[4];
          ldmatrix_x4_trans(bo, b_trans_fragment_address<D>(do_tile, kc * 16, kDimOffset + d2 * 16, lane));
          mma_16816<T>(dv[2 * d2], ap, bo[0], bo[1]);
          mma_16816<T>(dv[2 * d2 + 1], ap, bo[2], bo[3]);
        }
      }
#pragma unroll
      for (int kc = 0; kc < kBlockM / 16; ++kc) {
        const uint32_t ads[4] = {grad_scores[2 * kc][0], grad_scores[2 * kc][1], grad_scores[2 * kc + 1][0],
                                 grad_scores[2 * kc + 1][1]};
#pragma unroll
        for (int d2 = 0; d2 < kDimTiles / 2; ++d2) {
          uint32_t bq[4];
          ldmatrix_x4_trans(bq, b_trans_fragment_address<D>(q_tile, kc * 16, kDimOffset + d2 * 16, lane));
          mma_16816<T>(dk[2 * d2], ads, bq[0], bq[1]);
          mma_16816<T>(dk[2 * d2 + 1], ads, bq[2], bq[3]);
        }
      }
      __syncthreads();

      // dQ (kBlockM x D) += dS K: this warp's m16 row block and kDqTiles n8
      // tiles, 4 at a time (fewer live registers next to dK and dV).
      const int row_block = warp / kWarpsPerRowBlock;
#pragma unroll
      for (int chunk = 0; chunk < kDqTiles / kDqChunk; ++chunk) {
        const int first_dim_tile = kDimOffset / 8 + (warp % kWarpsPerRowBlock) * kDqTiles + chunk * kDqChunk;
        float dq[kDqChunk][4];
#pragma unroll
        for (int i = 0; i < kDqChunk; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < kBlockN / 16; ++kc) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, a_trans_fragment_address<kBlockM>(ds_tile, kc * 16, row_block * 16, lane));
#pragma unroll
          for (int d2 = 0; d2 < kDqChunk / 2; ++d2) {
            uint32_t bk[4];
            ldmatrix_x4_trans(bk, b_trans_fragment_address<D>(k_tile, kc * 16, (first_dim_tile + 2 * d2) * 8, lane));
            mma_16816<T>(dq[2 * d2], a, bk[0], bk[1]);
            mma_16816<T>(dq[2 * d2 + 1], a, bk[2], bk[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int query = row0 + row_block * 16 + g + 8 * r;
          if (query >= p.L) continue;
          float* dq_row = p.dq_accum + (bh * p.L + query) * p.E;
#pragma unroll
          for (int d = 0; d < kDqChunk; ++d) {
            const int col = (first_dim_tile + d) * 8 + 2 * t;
            if (col < p.E) {
              atomicAdd(dq_row + col, dq[d][2 * r] * p.scale);
              atomicAdd(dq_row + col + 1, dq[d][2 * r + 1] * p.scale);
            }
          }
        }
      }
    }

    cp_async_wait_all();  // nothing in flight into the K, V tiles that the next key block reloads

    // dK (scaled) and dV of the warp's 16 keys.
    T* dk_head = static_cast<T*>(p.dk) + kv_index * p.S * p.E;
    T* dv_head = static_cast<T*>(p.dv) + kv_index * p.S * p.Ev;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = keys[r];
      if (key >= p.S) continue;
#pragma unroll
      for (int d = 0; d < kDimTiles; ++d) {
        const int col = kDimOffset + d * 8 + 2 * t;
        if (col < p.E) {
          *reinterpret_cast<uint32_t*>(dk_head + static_cast<int64_t>(key) * p.E + col) =
              pack2<T>(dk[d][2 * r] * p.scale, dk[d][2 * r + 1] * p.scale);
        }
        if (col < p.Ev) {
          *reinterpret_cast<uint32_t*>(dv_head + static_cast<int64_t>(key) * p.Ev + col) =
              pack2<T>(dv[d][2 * r], dv[d][2 * r + 1]);
        }
      }
    }
  }
}

template <typename T, int D>
void run_attention_backward(const AttentionParams& params, bool deterministic, cudaStream_t stream) {
  const LaunchGrid grid = backward_grid(params.batch, params.kv_heads, params.S, D, deterministic);
  constexpr int kSharedBytes = backward_smem_bytes(D);
  const bool general = params.mask != nullptr || params.dropout || params.grad_mask != nullptr;
  const dim3 blocks(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z));
  auto launch = [&](auto kernel, const AttentionParams& p) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
    kernel<<<blocks, kThreads, kSharedBytes, stream>>>(p);
  };
  launch(general ? attention_backward_kernel<T, D, true, 0> : attention_backward_kernel<T, D, false, 0>, params);
  if constexpr (backward_passes(D) == 2) {
    // The second half of the head-dim columns; the mask gradient (the same for
    // every column) was written by the first pass.
    constexpr int kSecond = backward_pass_dim(D);
    AttentionParams second = params;
    second.grad_mask = nullptr;
    launch(general ? attention_backward_kernel<T, D, true, kSecond> : attention_backward_kernel<T, D, false, kSecond>,
           second);
  }
  static_assert(backward_passes(D) <= 2, "at most two passes");
}

}  // namespace cuda_attention
}  // namespace attnkernels
