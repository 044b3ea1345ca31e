// Device building blocks of the CUDA fused attention: tensor-core MMA
// (mma.sync m16n8k16, fp32 accumulate), ldmatrix, cp.async, a swizzled
// shared-memory tile layout, and the loads of masks and dropout decisions.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8, k x n):      b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16 x 8, float):      c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// so the C fragments of two adjacent n8 tiles are, packed to 16 bits, the A
// fragment of a 16 x 16 product: the softmax probabilities feed P V from registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "attention_launch.h"

namespace attnkernels {
namespace cuda_attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float negative_infinity() { return -__int_as_float(0x7f800000); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    bits = *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __half2 pair = __floats2half2_rn(lo, hi);
    bits = *reinterpret_cast<const uint32_t*>(&pair);
  }
  return bits;
}

// (torch builds with __CUDA_NO_HALF_CONVERSIONS__: no implicit casts.)
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// d += a b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i,
// and each lane receives (row lane/4, columns 2(lane%4)..+1) of each matrix,
// or with .trans (rows 2(lane%4)..+1, column lane/4).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16 bytes global -> shared without passing through registers; zero-filled
// when !valid (rows past the sequence, columns past the head dim).
__device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global, bool valid) {
  const int source_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global), "r"(source_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// A (rows x kCols) tile of 16-bit elements in shared memory, row-major, with
// the 16-byte chunks of row r permuted by XOR with r % 8: the 8 row addresses
// of an ldmatrix then hit 8 different bank groups.
template <int kCols>
struct SwizzledTile {
  static constexpr int kChunks = kCols / 8;
  static constexpr int kSwizzleMask = (kChunks < 8 ? kChunks : 8) - 1;
  static_assert(kCols % 16 == 0, "tiles are whole 32-byte rows");

  __device__ __forceinline__ static int offset(int row, int col) {
    return row * kCols + ((((col >> 3) ^ (row & kSwizzleMask))) << 3) + (col & 7);
  }
};

// Copies rows [0, kRows) x columns [0, kCols) of a row-major global matrix
// (row stride in elements) into a swizzled tile; rows >= valid_rows and
// columns >= valid_cols (a multiple of 8) become zeros.
template <int kRows, int kCols, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* global, int64_t row_stride, int64_t valid_rows,
                                                int valid_cols) {
  // Thread i copies chunk i % kChunks of rows i / kChunks, + kRowsPerStep, ...:
  // one column and one running source pointer per thread (few live registers).
  constexpr int kChunks = kCols / 8;
  constexpr int kRowsPerStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowsPerStep == 0, "every thread copies whole columns");
  const int col = (static_cast<int>(threadIdx.x) % kChunks) * 8;
  const int first_row = static_cast<int>(threadIdx.x) / kChunks;
  const bool col_valid = col < valid_cols;
  const T* source = global + first_row * row_stride + col;
  const int64_t source_step = kRowsPerStep * row_stride;
#pragma unroll
  for (int row = first_row; row < kRows; row += kRowsPerStep) {
    const bool valid = col_valid && row < valid_rows;
    cp_async_16(shared_address(tile + SwizzledTile<kCols>::offset(row, col)), valid ? source : global, valid);
    source += source_step;
  }
}

// ldmatrix addresses for the fragments of a 16x16 block at (row0, col0) of a tile:
// as the A operand (rows = M, columns = K), non-transposed ...
template <int kCols, typename T>
__device__ __forceinline__ uint32_t a_fragment_address(const T* tile, int row0, int col0, int lane) {
  return shared_address(tile + SwizzledTile<kCols>::offset(row0 + (lane % 16), col0 + (lane / 16) * 8));
}

// ... as two B operands (n8 tiles) from a tile stored n-major (rows = N,
// columns = K, e.g. K for Q K^T): r0, r1 = b0, b1 of rows row0..+7; r2, r3 of rows row0+8..+15.
template <int kCols, typename T>
__device__ __forceinline__ uint32_t b_fragment_address(const T* tile, int row0, int col0, int lane) {
  return shared_address(tile + SwizzledTile<kCols>::offset(row0 + (lane % 8) + (lane / 16) * 8,
                                                           col0 + ((lane / 8) % 2) * 8));
}

// ... as two B operands from a tile stored k-major (rows = K, columns = N,
// e.g. V for P V), with ldmatrix .trans: r0, r1 = b0, b1 of columns col0..+7;
// r2, r3 of columns col0+8..+15.
template <int kCols, typename T>
__device__ __forceinline__ uint32_t b_trans_fragment_address(const T* tile, int row0, int col0, int lane) {
  return shared_address(tile + SwizzledTile<kCols>::offset(row0 + (lane % 8) + ((lane / 8) % 2) * 8,
                                                           col0 + (lane / 16) * 8));
}

// ... as the A operand of a tile stored transposed (rows = K, columns = M,
// e.g. dS^T for dQ = dS K), with ldmatrix .trans.
template <int kCols, typename T>
__device__ __forceinline__ uint32_t a_trans_fragment_address(const T* tile, int row0, int col0, int lane) {
  return shared_address(tile + SwizzledTile<kCols>::offset(row0 + (lane % 8) + (lane / 16) * 8,
                                                           col0 + ((lane / 8) % 2) * 8));
}

// The attention mask at (batch b, query head h, query row, key col), through
// its strides; returns the base-2 additive term (0 or -inf for a bool mask).
__device__ __forceinline__ float mask_term(const AttentionParams& p, int b, int h, int row, int col) {
  const int64_t offset = b * p.mask_stride_b + h * p.mask_stride_h + row * p.mask_stride_l + col * p.mask_stride_s;
  if (p.mask_is_bool) return static_cast<const bool*>(p.mask)[offset] ? 0.0f : negative_infinity();
  // In base 2, a value below -FLT_MAX / log2(e) (a mask at float's lowest, how many models hide
  // keys) would overflow to -inf and hide a row that torch lets attend uniformly: it stays at the
  // lowest finite float instead. -inf and NaN pass unchanged.
  const float value = static_cast<const float*>(p.mask)[offset];
  const float scaled = value * kLog2e;
  return scaled == negative_infinity() && value != negative_infinity() ? -FLT_MAX : scaled;
}

// Flat (B, Hq, L, S) index of an attention-matrix element, the dropout counter.
__device__ __forceinline__ uint64_t attention_element(const AttentionParams& p, int64_t bh, int row, int col) {
  return static_cast<uint64_t>((bh * p.L + row) * p.S + col);
}

}  // namespace cuda_attention
}  // namespace attnkernels
