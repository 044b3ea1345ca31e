// One block of channels of one sampling point, forward and backward: the
// weighted sum over the point's taps and the scatter of the gradient, with a
// block's accumulators in vector registers. The CPU sampling loops
// (sampler_loops.h) call these per point and block.
#pragma once

#include "../cpu_isa.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../sampler_shape.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Channels per block of the sampling loops, one vector value each. 16 fp32 are one AVX-512 register; the
// AVX2 variant uses 8 (one AVX2 register): a 16-lane GCC vector there lived on the stack between taps, and
// that build ran slower than the default one.
#if defined(ATTNKERNELS_CPU_AVX2)
constexpr int64_t kChannelBlock = 8;
#else
constexpr int64_t kChannelBlock = 16;
#endif

// Channels are processed in blocks of kChannelBlock whose width is known at
// compile time, so that a block's accumulators live in vector registers; the
// last partial block (width 0 below: known only at run time) and small
// channel counts (1 to 4, specialised) follow the same code.

// acc[c] = sum over taps of weight * src[tap + c0 + c], c < width.
template <int W, typename acc_t, NanPolicy policy, typename Taps>
inline void forward_block(const Taps& taps, const acc_t* src, int64_t c0, int64_t runtime_width, acc_t* acc) {
  const int64_t width = W > 0 ? W : runtime_width;
  for (int64_t c = 0; c < width; ++c) acc[c] = acc_t(0);
  for (int t = 0; t < taps.kCount; ++t) {
    const acc_t w = taps.weight[t];
    if (taps.valid[t]) {
      const acc_t* run = src + taps.offset[t] + c0;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) acc[c] += w * run[c];
    } else if (policy == NanPolicy::Sampler2d && !std::isfinite(w)) {
      // torch's 4-D kernel multiplies the weight by a zero tap: NaN here.
      for (int64_t c = 0; c < width; ++c) acc[c] += w * acc_t(0);
    }
  }
}

// A whole block of kChannelBlock channels as one vector value (GCC/Clang
// vector extensions): the per-axis sums stay in registers across the taps,
// where the arrays of backward_block / forward_block are kept on the stack.
template <typename acc_t>
struct ChannelVectorOf {
  typedef acc_t type __attribute__((vector_size(sizeof(acc_t) * kChannelBlock)));
};
template <typename acc_t>
using ChannelVector = typename ChannelVectorOf<acc_t>::type;

template <typename acc_t>
inline ChannelVector<acc_t> load_block(const acc_t* p) {
  ChannelVector<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename acc_t>
inline void store_block(acc_t* p, const ChannelVector<acc_t>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename acc_t, NanPolicy policy, typename Taps>
inline void forward_full_block(const Taps& taps, const acc_t* src, int64_t c0, acc_t* out) {
  ChannelVector<acc_t> acc = {};
  for (int t = 0; t < taps.kCount; ++t) {
    const acc_t w = taps.weight[t];
    if (taps.valid[t]) {
      acc += w * load_block(src + taps.offset[t] + c0);
    } else if (policy == NanPolicy::Sampler2d && !std::isfinite(w)) {
      acc += w * ChannelVector<acc_t>{};  // torch's 4-D kernel: NaN here
    }
  }
  store_block(out, acc);
}

// The sum of a block's lanes as a tree (lane i + lane i + width/2, halving):
// a few shuffles and adds, where a lane-by-lane sum is one long chain of
// dependent scalar adds. The order is fixed, so a point's result never
// depends on anything but its own values.
template <typename acc_t>
inline acc_t tree_sum(const ChannelVector<acc_t>& v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && kChannelBlock == 16) {
    __m512 x;
    std::memcpy(&x, &v, sizeof(x));
    return _mm512_reduce_add_ps(x);  // halves 256, 128, 64, 32 bits: the order below
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<acc_t, float> && kChannelBlock == 8) {
    __m256 x;
    std::memcpy(&x, &v, sizeof(x));
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
  }
#endif
  acc_t lanes[kChannelBlock];
  std::memcpy(lanes, &v, sizeof(lanes));
  for (int64_t width = kChannelBlock / 2; width > 0; width /= 2) {
    for (int64_t c = 0; c < width; ++c) lanes[c] += lanes[c + width];
  }
  return lanes[0];
}

// One whole block of the backward: scatter weight * g into grad_src (when
// given) and add, per axis, sum over taps of d weight / d coordinate * src[tap]
// * g to the vector `coord_sums` (reduced to a scalar once per point, by the
// caller, after the last whole block).
template <typename acc_t, int Dims, bool has_coord_grad, typename Taps>
inline void backward_full_block(const Taps& taps, const acc_t* src, acc_t* grad_src, const acc_t* g, int64_t c0,
                                bool need_coords, ChannelVector<acc_t>* coord_sums) {
  const bool coords = has_coord_grad && need_coords;
  const ChannelVector<acc_t> grad = load_block(g);
  ChannelVector<acc_t> direction[Dims] = {};
  for (int t = 0; t < taps.kCount; ++t) {
    if (!taps.valid[t]) continue;
    if (grad_src != nullptr) {
      acc_t* run = grad_src + taps.offset[t] + c0;
      store_block(run, load_block(run) + taps.weight[t] * grad);
    }
    if (coords) {
      const ChannelVector<acc_t> value = load_block(src + taps.offset[t] + c0);
      for (int a = 0; a < Dims; ++a) direction[a] += taps.dweight[t][a] * value;
    }
  }
  if (coords) {
    for (int a = 0; a < Dims; ++a) coord_sums[a] += direction[a] * grad;
  }
}

// One channel block of the backward: scatter weight * g into grad_src (when
// given) and add sum over taps of d weight / d coordinate * <src[tap], g> to
// grad_xyz. The taps are summed per axis as vectors first, so that each axis
// needs one horizontal reduction per point rather than one per tap.
template <int W, typename acc_t, int Dims, bool has_coord_grad, typename Taps>
inline void backward_block(const Taps& taps, const acc_t* src, acc_t* grad_src, const acc_t* g, int64_t c0,
                           int64_t runtime_width, bool need_coords, acc_t* grad_xyz) {
  constexpr int64_t kWidth = W > 0 ? W : kChannelBlock;
  const int64_t width = W > 0 ? W : runtime_width;
  const bool coords = has_coord_grad && need_coords;
  acc_t direction[Dims][kWidth];
  if (coords) {
    for (int a = 0; a < Dims; ++a) {
      for (int64_t c = 0; c < width; ++c) direction[a][c] = acc_t(0);
    }
  }
  for (int t = 0; t < taps.kCount; ++t) {
    if (!taps.valid[t]) continue;
    if (grad_src != nullptr) {
      acc_t* run = grad_src + taps.offset[t] + c0;
      const acc_t w = taps.weight[t];
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) run[c] += w * g[c];
    }
    if (coords) {
      const acc_t* run = src + taps.offset[t] + c0;
      for (int a = 0; a < Dims; ++a) {
        const acc_t dw = taps.dweight[t][a];
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) direction[a][c] += dw * run[c];
      }
    }
  }
  if (coords) {
    for (int a = 0; a < Dims; ++a) {
      acc_t dot = acc_t(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < width; ++c) dot += direction[a][c] * g[c];
      grad_xyz[a] += dot;
    }
  }
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
