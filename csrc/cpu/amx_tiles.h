// bfloat16 tile products on AMX (Intel Sapphire Rapids and later; avx512 variant only): the tile
// registers multiply a 16 x 32 bfloat16 tile by a 32 x 16 one into a 16 x 16 float32 tile in one
// instruction (tdpbf16ps), about 8x the multiply-adds per cycle of AVX512-BF16's vdpbf16ps.
// Called only when amx_tiles_enabled() (cpu_kernels.h) says the CPU has AMX-BF16 and the OS gave
// this process the tile state; the functions carry the AMX target attribute themselves.
//
// amx_product takes the right operand in the packed panels of dot_tiles.h (32 columns of 32-bit
// words, each word a pair of the reduction index): 16 consecutive pair rows of a panel's first or
// last 16 columns are exactly the B tile tdpbf16ps reads (16 rows of 64 bytes, row stride 128).
#pragma once

#include "../cpu_isa.h"
#include "dot_tiles.h"

#if defined(ATTNKERNELS_CPU_AVX512)
#define ATTNKERNELS_AMX_TILES 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define ATTNKERNELS_AMX_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// A block of C is 32 x 32 floats: tiles 0-3 (two rows of tiles of 16 x 16), from the A tiles 4-5
// (16 rows each) and the B tiles 6-7 (16 columns each). The reduction advances 32 bfloat16 a step.
constexpr int64_t kAmxRows = 32;
constexpr int64_t kAmxDepth = 32;
static_assert(kDotColumns == 32, "a C block's columns are one packed panel");

// How many entries of a query row past its causal diagonal a skipping amx_product reads from its
// left operand (they must be 0): a block's reduction ends at its last row's diagonal (up to 31 rows
// further), rounded up to a whole step of 32.
constexpr int64_t kAmxReadsPastDiagonal = kAmxRows + kAmxDepth;

inline int64_t round_up(int64_t x, int64_t step) { return (x + step - 1) / step * step; }

// The palette-1 configuration: the 8 tiles above, each 16 rows of 64 bytes.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// C rows [0, rows) and columns [0, cols) of a 32 x 32 block: alpha * block (+ C).
ATTNKERNELS_AMX_TARGET inline void amx_store_block(const float* block, int64_t rows, int64_t cols, float alpha,
                                                   bool accumulate, float* c, int64_t ldc) {
  const __m512 scale = _mm512_set1_ps(alpha);
  const __mmask16 low = static_cast<__mmask16>(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  const __mmask16 high = static_cast<__mmask16>(cols >= 32 ? 0xFFFFu : cols > 16 ? (1u << (cols - 16)) - 1u : 0u);
  for (int64_t i = 0; i < rows; ++i) {
    float* out = c + i * ldc;
    __m512 x0 = _mm512_mul_ps(_mm512_load_ps(block + i * kDotColumns), scale);
    __m512 x1 = _mm512_mul_ps(_mm512_load_ps(block + i * kDotColumns + 16), scale);
    if (accumulate) {
      x0 = _mm512_add_ps(x0, _mm512_maskz_loadu_ps(low, out));
      x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(high, out + 16));
    }
    _mm512_mask_storeu_ps(out, low, x0);
    if (high) _mm512_mask_storeu_ps(out + 16, high, x1);
  }
}

// C (m x n, row stride ldc) = alpha * A B (+ C when accumulate), accumulated in float32.
// A (m x k bfloat16, row stride lda elements): rows up to round_up(m, 32) must be readable (their
// products past m are discarded), k a multiple of 32. B (k x n): packed panels of b_pairs >= k / 2
// pair rows each (dot_tiles.h); a panel's padding columns may hold anything (discarded).
// skip (dot_tiles.h): kColumnsAfter leaves C's blocks right of their last row's diagonal as they
// were; kReductionAfter ends each block's reduction at its last row's diagonal rounded up to 32, so
// A's entries up to kAmxReadsPastDiagonal past each row's diagonal must be 0.
ATTNKERNELS_AMX_TARGET inline void amx_product(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
                                               const uint32_t* b, int64_t b_pairs, float alpha, bool accumulate,
                                               float* c, int64_t ldc, Skip skip = {}) {
  alignas(64) float block[kAmxRows * kDotColumns];
  const AmxTileConfig config;
  _tile_loadconfig(&config);
  const int64_t a_stride = lda * int64_t(sizeof(c10::BFloat16));
  constexpr int64_t b_stride = kDotColumns * int64_t(sizeof(uint32_t));
  for (int64_t i0 = 0; i0 < m; i0 += kAmxRows) {
    const int64_t rows = std::min(kAmxRows, m - i0);
    const int64_t seen_by_last_row = std::max<int64_t>(0, i0 + rows + skip.offset);  // its diagonal + 1
    const int64_t col_end = skip.kind == CausalSkip::kColumnsAfter ? std::min(n, seen_by_last_row) : n;
    const int64_t depth =
        skip.kind == CausalSkip::kReductionAfter ? std::min(k, round_up(seen_by_last_row, kAmxDepth)) : k;
    const c10::BFloat16* a_block = a + i0 * lda;
    for (int64_t j0 = 0; j0 < col_end; j0 += kDotColumns) {
      const uint32_t* panel = b + (j0 / kDotColumns) * b_pairs * kDotColumns;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t p0 = 0; p0 < depth; p0 += kAmxDepth) {
        _tile_loadd(4, a_block + p0, a_stride);
        _tile_loadd(5, a_block + 16 * lda + p0, a_stride);
        const uint32_t* b_step = panel + (p0 / 2) * kDotColumns;
        _tile_loadd(6, b_step, b_stride);
        _tile_loadd(7, b_step + 16, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, block, b_stride);
      _tile_stored(1, block + 16, b_stride);
      _tile_stored(2, block + 16 * kDotColumns, b_stride);
      _tile_stored(3, block + 16 * kDotColumns + 16, b_stride);
      amx_store_block(block, rows, std::min(kDotColumns, n - j0), alpha, accumulate, c + i0 * ldc + j0, ldc);
    }
  }
  _tile_release();
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels

#endif  // ATTNKERNELS_CPU_AVX512
