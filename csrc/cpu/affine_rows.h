// The fused affine_grid_sample, bilinear with zeros or border padding, vectorised
// over output points instead of channels.
//
// The channel-vectorised sampler (sampler_loops.h) spends its time per point
// when there are few channels (RGB video: C = 3): tap indices, weights, and the
// theta gradient are scalar work repeated for every output position. Here one
// tile holds kLanes consecutive points of one output row; their coordinates,
// taps and weights are computed as vectors, the input is gathered per channel
// straight from its (N, C, [D,] H, W) layout (no channels-last copy), the
// output is stored as contiguous runs, and the theta gradient is summed per
// lane. The arithmetic is that of grid_sample_math.h, in the same order, so
// the forward equals the scalar path bit for bit; only the backward's order of
// summation differs.
//
// Only finite theta and coordinates well inside the int32 range take this path
// (see affine_rows_eligible): NaN/Inf rules and reflection stay with the scalar
// path, which reproduces torch's.
#pragma once

#include "../cpu_isa.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "affine_coords.h"
#include "pixel_quads.h"
#include "tile_backward.h"
#include "channels_last_layout.h"
#include "sampler_loops.h"
#include "scratch_memory.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Channels up to which the forward takes the row path. Its tiles gather each tap from every
// channel's plane; with more channels the channels-last sampler, which reads a tap's channels as
// vectors, can be faster once the input is not in cache. Measured (Zen 5, 2 threads, inputs
// rotated; C = 16 and 32, row path -> channels-last): 3-D C = 16 about 2x faster in both vector
// variants; 2-D 1.3-2x faster in the avx512 variant, while in the avx2 variant even at C = 16 and
// 1.5x slower at C = 32 (its gathers are cheaper against its narrower channel vectors). The
// default variant keeps the row path (not measured).
constexpr int64_t affine_rows_forward_most_channels(int64_t dims) {
#if defined(ATTNKERNELS_CPU_AVX512)
  (void)dims;
  return 8;
#elif defined(ATTNKERNELS_CPU_AVX2)
  return dims == 2 ? std::numeric_limits<int64_t>::max() : 8;
#else
  (void)dims;
  return std::numeric_limits<int64_t>::max();
#endif
}

// Whether the row path serves these arguments: bilinear, zeros or border
// padding, finite theta, and every tap offset (in range or not) within int32:
// with base coordinates in [-1, 1], a pixel index along axis r is at most
// (reach_r + 1) * size_r / 2 + 2 in magnitude, where reach_r sums |theta[r]|.
template <typename acc_t, int Dims>
bool affine_rows_eligible(const acc_t* theta, const SamplerShape& s, int64_t interpolation) {
  if (static_cast<Interpolation>(interpolation) != Interpolation::Bilinear) return false;
  if (s.padding == Padding::Reflection) return false;
  constexpr int kCols = Dims + 1;
  for (int64_t n = 0; n < s.batch; ++n) {
    double largest_offset = 0.0;
    double stride = 1.0;
    for (int r = 0; r < Dims; ++r) {
      double reach = 0.0;
      for (int a = 0; a < kCols; ++a) {
        const double v = double(theta[(n * Dims + r) * kCols + a]);
        if (!std::isfinite(v)) return false;
        reach += std::fabs(v);
      }
      largest_offset += ((reach + 1.0) * double(s.in_size[r]) / 2.0 + 2.0) * stride;
      stride *= double(s.in_size[r]);
    }
    if (largest_offset >= double(int64_t(1) << 30)) return false;
  }
  return true;
}

// Rows of the output: (batch, [z,] y), each of out_size[0] points.
template <int Dims>
inline int64_t output_rows(const SamplerShape& s) {
  return s.batch * s.out_size[1] * (Dims > 2 ? s.out_size[2] : 1);
}

// Base x coordinates padded with zeros to whole tiles.
template <typename acc_t, int Dims>
AlignedVector<acc_t> padded_base_x(const AffineCoords<acc_t, Dims>& coords, int64_t width) {
  constexpr int L = PointTile<acc_t, Dims>::kLanes;
  AlignedVector<acc_t> bx(((width + L - 1) / L) * L, acc_t(0));
  std::copy(coords.base[0].begin(), coords.base[0].end(), bx.begin());
  return bx;
}

// out[n, c, position] for every output position; `input` is contiguous. With
// `quads` (fp32, quads_apply: the input packed by pack_quads) the tiles read those.
template <typename scalar_t, typename acc_t, int Dims, bool border>
void affine_rows_forward(const SamplerShape& s, const scalar_t* input, const AffineCoords<acc_t, Dims>& coords,
                         scalar_t* out, const float* quads = nullptr) {
  using Tile = PointTile<acc_t, Dims>;
  constexpr int L = Tile::kLanes;
  constexpr int kCols = Dims + 1;
  const int64_t W = s.out_size[0];
  const int64_t H = s.out_size[1];
  const int64_t rows_per_item = output_rows<Dims>(s) / s.batch;
  const int64_t in_plane = s.in_points;
  const int64_t out_plane = s.out_points;
  const int64_t C = s.channels;
  const AlignedVector<acc_t> bx = padded_base_x(coords, W);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, W * C));
#if defined(ATTNKERNELS_TILES_AVX2)
  const bool pair_gathers = std::is_same_v<scalar_t, float> && quads == nullptr && pair_gathers_avx2();
  (void)pair_gathers;  // read by the fp32 tiles only
#endif
  at::parallel_for(0, output_rows<Dims>(s), grain, [&](int64_t begin, int64_t end) {
    Tile tile;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / rows_per_item;
      const int64_t within = row - n * rows_per_item;
      const acc_t by = Dims > 1 ? coords.base[1][within % H] : acc_t(0);
      const acc_t bz = Dims > 2 ? coords.base[2][within / H] : acc_t(0);
      const acc_t* t = coords.theta + n * Dims * kCols;
      for (int64_t x0 = 0; x0 < W; x0 += L) {
        const int64_t count = std::min<int64_t>(L, W - x0);
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
          const float* planes = input + n * C * in_plane;
          float* dst = out + n * C * out_plane + within * W + x0;
          if (quads != nullptr) {
            tile.template build<border, false, true>(t, bx.data() + x0, by, bz, s);
            sample_quads(tile, quads + n * bordered_points<Dims>(s) * kQuad, quad_zeros<Dims>(quads, s), C, dst,
                         out_plane, count);
            continue;
          }
#if defined(__AVX512F__)
          Tile::template sample_row_avx512<border>(t, bx.data() + x0, by, bz, s, planes, in_plane, C, dst, out_plane,
                                                   count);
#else
          sample_row_avx2<border, Dims>(t, bx.data() + x0, by, bz, s, planes, in_plane, C, dst, out_plane, count,
                                        pair_gathers);
#endif
          continue;
        }
#endif
        tile.template build<border, false>(t, bx.data() + x0, by, bz, s);
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* plane = input + (n * C + c) * in_plane;
          scalar_t* dst = out + (n * C + c) * out_plane + within * W + x0;
          acc_t acc[L];
          tile.sample(plane, acc);
          for (int64_t l = 0; l < count; ++l) dst[l] = static_cast<scalar_t>(acc[l]);
        }
      }
    }
  });
}

// Backward over `copies` contiguous row ranges: range r scatters weight *
// grad_output into its own slice of `private_grads` (when given), (N, C,
// in_points) or, when scatter_channels_last(C), (N, in_points, C), and adds its
// theta gradient to slot r of `coords`. With `quad_layout` (fp32, quads_apply)
// the slices are in the quad layout (quad_buffer_size floats) and the tiles read
// the input from `quads` (packed by pack_quads; needed only with `need_theta`).
// With `shared_buffer` (ranges_hold_whole_items) every range scatters into the
// one slice.
template <typename scalar_t, typename acc_t, int Dims, bool border>
void affine_rows_backward(const SamplerShape& s, const scalar_t* input, AffineCoords<acc_t, Dims>& coords,
                          const scalar_t* grad_out, acc_t* private_grads, bool need_theta, int64_t copies,
                          bool quad_layout = false, const float* quads = nullptr, bool shared_buffer = false) {
  using Tile = PointTile<acc_t, Dims>;
  constexpr int L = Tile::kLanes;
  constexpr int kCols = Dims + 1;
  const int64_t W = s.out_size[0];
  const int64_t H = s.out_size[1];
  const int64_t rows = output_rows<Dims>(s);
  const int64_t rows_per_item = rows / s.batch;
  const int64_t in_plane = s.in_points;
  const int64_t out_plane = s.out_points;
  const int64_t C = s.channels;
  const int64_t per_copy = quad_layout ? quad_buffer_size<Dims>(s) : s.batch * C * in_plane;
  const int64_t item_grads = quad_layout ? bordered_points<Dims>(s) * kQuad : C * in_plane;
  const AlignedVector<acc_t> bx = padded_base_x(coords, W);
  at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
    Tile tile;
    AlignedVector<acc_t> tile_grads(C * L);  // grad_output of the tile, channel-major
    for (int64_t r = first; r < last; ++r) {
      acc_t* grads = private_grads == nullptr ? nullptr : private_grads + (shared_buffer ? 0 : r * per_copy);
      for (int64_t row = rows * r / copies; row < rows * (r + 1) / copies; ++row) {
        const int64_t n = row / rows_per_item;
        const int64_t within = row - n * rows_per_item;
        const acc_t by = Dims > 1 ? coords.base[1][within % H] : acc_t(0);
        const acc_t bz = Dims > 2 ? coords.base[2][within / H] : acc_t(0);
        const acc_t* t = coords.theta + n * Dims * kCols;
        // Per lane, per coordinate: sum of grad * base x, and sum of grad.
        double with_x[Dims][L] = {};
        double plain[Dims][L] = {};
        for (int64_t x0 = 0; x0 < W; x0 += L) {
          const int64_t count = std::min<int64_t>(L, W - x0);
          acc_t grad_xyz[Dims][L] = {};
          bool done = false;
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
            if (quad_layout) {
              if (need_theta) tile.template build<border, true, true>(t, bx.data() + x0, by, bz, s);
              else tile.template build<border, false, true>(t, bx.data() + x0, by, bz, s);
              const float* read = quads == nullptr ? nullptr : quads + n * bordered_points<Dims>(s) * kQuad;
              const float* zeros = quads == nullptr ? nullptr : quad_zeros<Dims>(quads, s);
              quads_tile_backward(tile, read, zeros, grad_out + n * C * out_plane + within * W + x0, out_plane, C,
                                  count, grads == nullptr ? nullptr : grads + n * item_grads,
                                  need_theta ? grad_xyz : nullptr);
              done = true;
            }
          }
#endif
          if (!done) {
            if (need_theta) tile.template build<border, true>(t, bx.data() + x0, by, bz, s);
            else tile.template build<border, false>(t, bx.data() + x0, by, bz, s);
            tile_backward<scalar_t, acc_t, Dims>(tile, input + n * C * in_plane, in_plane,
                                                 grad_out + n * C * out_plane + within * W + x0, out_plane, C, count,
                                                 grads == nullptr ? nullptr : grads + n * item_grads,
                                                 tile_grads.data(), need_theta ? grad_xyz : nullptr);
          }
          if (need_theta) {
            for (int a = 0; a < Dims; ++a) {
#pragma omp simd
              for (int l = 0; l < L; ++l) {
                // Lanes past the row end hold 0 * (values of arbitrary points): drop them.
                const double grad = l < count ? double(grad_xyz[a][l]) : 0.0;
                with_x[a][l] += grad * double(bx[x0 + l]);
                plain[a][l] += grad;
              }
            }
          }
        }
        if (need_theta) {
          double* g = coords.grad_theta.data() + (r * s.batch + n) * Dims * kCols;
          const double base_yz[2] = {double(by), double(bz)};
          for (int a = 0; a < Dims; ++a) {
            double sum_x = 0.0, sum = 0.0;
            for (int l = 0; l < L; ++l) {
              sum_x += with_x[a][l];
              sum += plain[a][l];
            }
            g[a * kCols + 0] += sum_x;
            for (int b = 1; b < Dims; ++b) g[a * kCols + b] += sum * base_yz[b - 1];
            g[a * kCols + Dims] += sum;
          }
        }
      }
    }
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
