// grid_sample for a few channels (fp32, bilinear, zeros or border), forward and
// backward, vectorised over points, reading the input in its own
// (N, C, [D,] H, W) layout or, with 3 or 4 channels, as pixel quads.
//
// With 1 to 4 channels the channel-vectorised sampler (sampler_loops.h) does
// little vector work per point and pays for a channels-last copy of the input
// (and, backward, a channels-last gradient transposed at the end); torch's 2-D
// kernel, vectorised over points, was ~2x faster on RGB images. Here each
// group of consecutive output points gets its taps as vectors (PointTile, from
// the stored grid). The forward keeps them in registers and gathers each
// channel per tap (or pair of x-neighbour taps) with one contiguous store per
// channel; the backward builds a tile and scatters per tap into planar private
// copies of the input gradient. With 3 or 4 channels the tiles can read, and
// the backward scatters, pixel quads (pixel_quads.h), with the same results
// (forward_reads_quads says when the forward does). A group with a
// non-finite or far-out coordinate goes point by point, with the general
// sampler's NaN rules and, for its other points, the tiles' arithmetic (so a
// point's results never depend on its neighbours).
#pragma once

#include "../cpu_isa.h"
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "pixel_quads.h"
#include "point_tile.h"
#include "sampler_loops.h"
#include "tile_backward.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr int64_t kPlanarMaxChannels = 4;

// Whether the planar kernels can serve these arguments (fp32 input and grid
// are the caller's check): only the vectorised variants build tiles.
inline bool planar_applies(const SamplerShape& s, int64_t interpolation) {
#if defined(__AVX512F__) || defined(__AVX2__)
  return s.channels <= kPlanarMaxChannels && static_cast<Interpolation>(interpolation) == Interpolation::Bilinear &&
         s.padding != Padding::Reflection && s.in_points <= PointTile<float, 2>::kMaxTilePoints;
#else
  (void)s;
  (void)interpolation;
  return false;
#endif
}

// Flattened (item, group within the item) indices from `first` on, each next() one further: by
// counting, not a division per group (which cost ~10 % of a one-channel forward).
struct GroupWalk {
  int64_t per_item;
  int64_t item;
  int64_t group;  // within the item
  GroupWalk(int64_t first, int64_t groups_per_item)
      : per_item(groups_per_item), item(first / groups_per_item), group(first - item * groups_per_item - 1) {}
  void next() {
    if (++group == per_item) {
      group = 0;
      ++item;
    }
  }
};

// out[n, c, p] for every output position; `input` (N, C, ...) contiguous fp32,
// `grid` (N, out_points, Dims) contiguous fp32; `quads`, when given, the input
// packed by pack_quads (quads_apply), which the tiles then read instead.
template <int Dims, NanPolicy policy>
void planar_forward(const SamplerShape& s, const float* input, const float* grid, float* out,
                    const float* quads = nullptr) {
  using Tile = PointTile<float, Dims>;
  const int64_t P = s.out_points;
  const int64_t C = s.channels;
  const int64_t plane = s.in_points;
  const int64_t groups_per_item = (P + kPointGroup - 1) / kPointGroup;
  SamplerShape one_channel = s;  // per-point fallback: offsets within one plane
  one_channel.channels = 1;
#if defined(ATTNKERNELS_TILES_AVX2)
  const bool pair_gathers = quads == nullptr && pair_gathers_avx2();
#endif
  at::parallel_for(0, s.batch * groups_per_item, 64, [&](int64_t begin, int64_t end) {
    [[maybe_unused]] Tile tile;  // for the quads
    PointTaps<float, Dims, Interpolation::Bilinear> taps;
    GroupWalk walk(begin, groups_per_item);
    for (int64_t group = begin; group < end; ++group) {
      walk.next();
      const int64_t n = walk.item;
      const int64_t p0 = walk.group * kPointGroup;
      const int64_t count = std::min(kPointGroup, P - p0);
      const float* points = grid + (n * P + p0) * Dims;
      const float* item = input + n * C * plane;
      float* dst = out + n * C * P + p0;
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
      // The planar input is sampled from taps kept in registers, the quads through a built tile.
      bool sampled = false;
      if (quads == nullptr) {
        const bool border = s.padding == Padding::Border;
#if defined(__AVX512F__)
        sampled = border ? Tile::template sample_points_avx512<true>(points, count, s, item, plane, C, dst, P)
                         : Tile::template sample_points_avx512<false>(points, count, s, item, plane, C, dst, P);
#else
        sampled = border ? sample_points_avx2<true, Dims>(points, count, s, item, plane, C, dst, P, pair_gathers)
                         : sample_points_avx2<false, Dims>(points, count, s, item, plane, C, dst, P, pair_gathers);
#endif
      } else if (build_tile(tile, points, count, s, false, true)) {
        sample_quads(tile, quads + n * bordered_points<Dims>(s) * kQuad, quad_zeros<Dims>(quads, s), C, dst, P, count);
        sampled = true;
      }
      if (sampled) continue;
#endif
      for (int64_t j = 0; j < count; ++j) {
        taps.template build<policy>(points + j * Dims, one_channel);
        for (int64_t c = 0; c < C; ++c) {
          // One channel at a time: the taps' offsets are within one plane.
          float acc;
          forward_block<1, float, policy>(taps, item + c * plane, 0, 0, &acc);
          dst[c * P + j] = acc;
        }
      }
    }
  });
}

// Whether the forwards of 3 or 4 fp32 channels (grid_sample's and the fused op's) read pixel quads
// or gather each channel from the planar input. Both give the same bits; which is faster depends on
// the CPU. Measured on RGB 224 x 224, N = 4, 2 threads: on AMD Zen 5 the quads were ~2x faster (its
// 16-lane gathers are slow); on an Intel Xeon with AMX the gathers were 1.2-1.6x faster (they are
// fast there, and packing the quads is a pass over the input into a buffer a third larger, which
// costs more than they save). So the first forward that could use them times both on a synthetic
// RGB image (a few hundred microseconds, once per process and instruction-set variant) and keeps
// the faster. ATTNKERNELS_PIXEL_QUADS=on or off forces either (read at every call: tests, tuning).
// The backward always reads and scatters quads (faster or even on both CPUs).

// Times the quad and gather forwards on a 2 x 3 x 128 x 128 image (calibration_grid; the quads' time
// includes allocating and packing them, as a call pays it).
inline bool measure_quads_faster() {
  constexpr int64_t kBatch = 2, kSide = 128;
  const SamplerShape s = calibration_shape(kBatch, 3, kSide);
  if (!quads_apply<2>(s)) return false;
  const at::Tensor input = at::arange(kBatch * 3 * kSide * kSide, at::kFloat).remainder_(251.0).div_(251.0);
  const std::vector<float> grid = calibration_grid(kBatch, kSide);
  std::vector<float> out(input.numel());
  return first_path_faster([&](bool with_quads) {
    const at::Tensor quads = with_quads ? packed_quads<2>(s, input) : at::Tensor();
    planar_forward<2, nan_policy_for<2>()>(s, input.const_data_ptr<float>(), grid.data(), out.data(),
                                           with_quads ? quads.const_data_ptr<float>() : nullptr);
  });
}

// measure_quads_faster's answer, measured once (for 2-D and 3-D alike).
inline bool quads_faster_here() {
  static const bool faster = measure_quads_faster();
  return faster;
}

// Whether this forward reads quads (quads_apply<Dims>(s) checked here too).
template <int Dims>
inline bool forward_reads_quads(const SamplerShape& s) {
  return quads_apply<Dims>(s) && path_taken("ATTNKERNELS_PIXEL_QUADS", &quads_faster_here);
}

// The backward of one point that the tiles decline, with the general sampler's
// NaN rules (taps that are not valid skipped) and tile_backward's order of
// operations. `grad_out` is at the point in channel 0; `grads` and `grad_xyz`
// as in tile_backward, for this point; `grads` in the quad layout (an item's
// bordered quads, pixel_quads.h) when `quad_grads`.
template <int Dims, NanPolicy policy>
inline void planar_point_backward(const float* point, const SamplerShape& one_channel, const float* input,
                                  const float* grad_out, int64_t out_plane, int64_t C, float* grads, float* grad_xyz,
                                  bool quad_grads = false) {
  const int64_t plane = one_channel.in_points;
  PointTaps<float, Dims, Interpolation::Bilinear> taps;
  taps.template build<policy>(point, one_channel);
  for (int t = 0; t < taps.kCount; ++t) {
    if (!taps.valid[t] || grads == nullptr) continue;
    if (quad_grads) {
      float* at = grads + bordered_index<Dims>(one_channel, taps.offset[t]) * kQuad;
      for (int64_t c = 0; c < C; ++c) at[c] += taps.weight[t] * grad_out[c * out_plane];
      continue;
    }
    for (int64_t c = 0; c < C; ++c) grads[c * plane + taps.offset[t]] += taps.weight[t] * grad_out[c * out_plane];
  }
  if (grad_xyz == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    float direction[Dims] = {};
    for (int t = 0; t < taps.kCount; ++t) {
      if (!taps.valid[t]) continue;
      const float value = input[c * plane + taps.offset[t]];
      for (int a = 0; a < Dims; ++a) direction[a] += taps.dweight[t][a] * value;
    }
    for (int a = 0; a < Dims; ++a) grad_xyz[a] += direction[a] * grad_out[c * out_plane];
  }
}

// The backward over `copies` contiguous ranges of point groups: range r
// scatters weight * grad_output into its own (N, C, in_points) slice of
// `private_grads` (zeroed; when given), or with `shared_buffer`
// (ranges_hold_whole_items) all into the one slice, and every point's d loss /
// d coordinate goes to `grad_grid` (N, out_points, Dims) when given. `input`, `grid` and
// `grad_out` contiguous. With `quad_layout` (quads_apply), each slice of
// `private_grads` is in the quad layout (quad_buffer_size floats), and the
// tiles read the input from `quads` (packed by pack_quads; needed only with
// `grad_grid`).
template <int Dims, NanPolicy policy>
void planar_backward(const SamplerShape& s, const float* input, const float* grid, const float* grad_out,
                     float* private_grads, float* grad_grid, int64_t copies, bool quad_layout = false,
                     const float* quads = nullptr, bool shared_buffer = false) {
  using Tile = PointTile<float, Dims>;
  constexpr int L = Tile::kLanes;
  const int64_t P = s.out_points;
  const int64_t C = s.channels;
  const int64_t plane = s.in_points;
  const int64_t groups_per_item = (P + L - 1) / L;
  const int64_t groups = s.batch * groups_per_item;
  const int64_t per_copy = quad_layout ? quad_buffer_size<Dims>(s) : s.batch * C * plane;
  const int64_t item_quads = bordered_points<Dims>(s) * kQuad;  // floats of an item in the quad layout
  SamplerShape one_channel = s;  // per-point fallback: offsets within one plane
  one_channel.channels = 1;
  at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
    Tile tile;
    float tile_grads[kPlanarMaxChannels * L];
    for (int64_t r = first; r < last; ++r) {
      float* grads = private_grads == nullptr ? nullptr : private_grads + (shared_buffer ? 0 : r * per_copy);
      const int64_t first_group = groups * r / copies, end_group = groups * (r + 1) / copies;
      GroupWalk walk(first_group, groups_per_item);
      for (int64_t group = first_group; group < end_group; ++group) {
        walk.next();
        const int64_t n = walk.item;
        const int64_t p0 = walk.group * L;
        const int64_t count = std::min<int64_t>(L, P - p0);
        const float* points = grid + (n * P + p0) * Dims;
        const float* item_input = input + n * C * plane;
        const float* item_grad_out = grad_out + n * C * P + p0;
        float* item_grads = grads == nullptr ? nullptr : grads + n * (quad_layout ? item_quads : C * plane);
        float* dst = grad_grid == nullptr ? nullptr : grad_grid + (n * P + p0) * Dims;
        if (!build_tile(tile, points, count, s, grad_grid != nullptr, quad_layout)) {
          for (int64_t j = 0; j < count; ++j) {
            float grad_xyz[Dims] = {};
            planar_point_backward<Dims, policy>(points + j * Dims, one_channel, item_input, item_grad_out + j, P, C,
                                                item_grads, grad_xyz, quad_layout);
            for (int a = 0; dst != nullptr && a < Dims; ++a) dst[j * Dims + a] = grad_xyz[a];
          }
          continue;
        }
        float grad_xyz[Dims][L] = {};
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
        if (quad_layout) {
          const float* read = quads == nullptr ? nullptr : quads + n * item_quads;
          const float* zeros = quads == nullptr ? nullptr : quad_zeros<Dims>(quads, s);
          quads_tile_backward(tile, read, zeros, item_grad_out, P, C, count, item_grads,
                              dst == nullptr ? nullptr : grad_xyz);
          for (int64_t l = 0; dst != nullptr && l < count; ++l) {
            for (int a = 0; a < Dims; ++a) dst[l * Dims + a] = grad_xyz[a][l];
          }
          continue;
        }
#endif
        tile_backward<float, float, Dims>(tile, item_input, plane, item_grad_out, P, C, count, item_grads, tile_grads,
                                          dst == nullptr ? nullptr : grad_xyz);
        if (dst == nullptr) continue;
        for (int64_t l = 0; l < count; ++l) {
          for (int a = 0; a < Dims; ++a) dst[l * Dims + a] = grad_xyz[a][l];
        }
      }
    }
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
