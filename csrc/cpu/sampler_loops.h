// The CPU sampling loops shared by grid_sample and the fused affine_grid_sample.
//
// Both ops sample a channels-last copy of the input (N, [D,] H, W, C) in the
// accumulation type, so that each tap is one contiguous, vectorisable run of
// channels. They differ only in where a point's grid coordinates come from
// (a stored grid, or theta applied to the base grid) and where the gradient to
// those coordinates goes: a `CoordinateSource` supplies both.
//
// The backward scatters into private per-range copies of the input gradient,
// so that threads never contend, and sums them at the end.
#pragma once

#include "../cpu_isa.h"
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../sampler_shape.h"
#include "channel_blocks.h"
#include "point_taps.h"
#include "point_tile.h"
#include "transpose_tiles.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// Whether the taps of a group of points can come from a vectorised tile: fp32
// with AVX-512 or AVX2, bilinear, zeros or border padding, and a source that stores
// its points (grid_sample's grid). Each group still falls back per point when
// build_tile() declines it (non-finite or far-out coordinates).
// Whether Source stores its points (has points_at); C++17, since torch 2.11 builds extensions so.
template <typename Source, typename = void>
struct StoresPoints : std::false_type {};
template <typename Source>
struct StoresPoints<Source, std::void_t<decltype(std::declval<const Source&>().points_at(int64_t(0)))>>
    : std::true_type {};

template <typename acc_t, Interpolation mode, typename Source>
constexpr bool tiles_possible() {
#if defined(__AVX512F__) || defined(__AVX2__)
  return std::is_same_v<acc_t, float> && mode == Interpolation::Bilinear && StoresPoints<Source>::value;
#else
  return false;
#endif
}

// Measured: tiles pay in 3-D (8 taps a point) and for few channels; 2-D with
// more than 16 channels ran ~5% faster point by point (256x256, C = 32), 2-D
// with C = 3 ~30% faster in tiles.
template <int Dims>
bool tiles_allowed(const SamplerShape& s) {
  return (Dims == 3 || s.channels <= 16) && s.padding != Padding::Reflection &&
         s.in_points <= PointTile<float, 2>::kMaxTilePoints;
}

// Builds the taps of the `count` points whose coordinates start at `points`
// into `tile` (with d weight / d coordinate when `with_dweight`); false when
// the tile path declines them.
template <int Dims>
bool build_tile(PointTile<float, Dims>& tile, const float* points, int64_t count, const SamplerShape& s,
                bool with_dweight) {
#if defined(__AVX512F__) || defined(__AVX2__)
  auto build = [&](auto border_tag, auto dweight_tag) {
    constexpr bool kBorder = decltype(border_tag)::value;
    constexpr bool kDweight = decltype(dweight_tag)::value;
#if defined(__AVX512F__)
    return tile.template build_from_points_avx512<kBorder, kDweight>(points, count, s);
#else
    return build_from_points_avx2<kBorder, kDweight>(tile, points, count, s);
#endif
  };
  const bool border = s.padding == Padding::Border;
  if (with_dweight) {
    return border ? build(std::true_type{}, std::true_type{}) : build(std::false_type{}, std::true_type{});
  }
  return border ? build(std::true_type{}, std::false_type{}) : build(std::false_type{}, std::false_type{});
#else
  return false;
#endif
}

// The taps of the cursor's point: lane `lane` of the group's tile when one was
// built (`tiled`), else computed from the point's coordinates. `Tile` is int
// where no tile can exist.
template <NanPolicy policy, typename Taps, typename Tile, typename Cursor>
inline void next_point_taps(Taps& taps, bool tiled, const Tile& tile, int64_t lane, int64_t channels,
                            bool with_dweight, const Cursor& cursor, const SamplerShape& s) {
  if constexpr (!std::is_same_v<Tile, int>) {
    if (tiled) {
      taps.load_lane(tile, int(lane), channels, with_dweight);
      return;
    }
  }
  typename Taps::value_type xyz[Taps::kDims];
  cursor.load(xyz);
  taps.template build<policy>(xyz, s);
}

// Consecutive output positions handled together: their results are staged
// (channel-major) and stored as one contiguous run per channel, instead of
// one scattered store per channel and point.
constexpr int64_t kPointGroup = 16;

// out[n, c, p] = sum over taps of weight * source[n, tap, c], for the points
// [begin, end) of the flattened (batch, output position) range.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, int kFixedChannels,
          typename Source>
void sample_forward_range(const SamplerShape& s, const acc_t* source, Source& coords,
                          scalar_t* out, int64_t begin, int64_t end) {
  const int64_t P = s.out_points;
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points * C;
  PointTaps<acc_t, Dims, mode> taps;
  auto cursor = coords.cursor(begin);
  PointCounter at(begin, P);
  // float: staged[j * C + c] (each point's channels one contiguous store), transposed to the output in
  // registers; other types: staged[c * kPointGroup + j], converted while copied out.
  constexpr bool kTransposeOut = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;
  const int64_t point_step = kTransposeOut ? C : 1;
  const int64_t channel_step = kTransposeOut ? 1 : kPointGroup;
  std::vector<acc_t> staged(C * kPointGroup);
  constexpr bool kTiles = tiles_possible<acc_t, mode, Source>();
  using Tile = std::conditional_t<kTiles, PointTile<float, Dims>, int>;
  Tile tile;
  const bool tiles = kTiles && tiles_allowed<Dims>(s);
  for (int64_t i = begin; i < end;) {
    const int64_t n = at.n;
    const int64_t p0 = at.p;
    const int64_t count = std::min({kPointGroup, end - i, P - p0});  // one batch item per group
    const acc_t* src = source + n * in_batch;
    bool tiled = false;
    if constexpr (kTiles) tiled = tiles && build_tile(tile, coords.points_at(i), count, s, false);
    for (int64_t j = 0; j < count; ++j, ++i, at.advance(), cursor.advance()) {
      next_point_taps<policy>(taps, tiled, tile, j, C, false, cursor, s);
      acc_t* dst = staged.data() + j * point_step;
      if constexpr (kFixedChannels > 0) {
        acc_t acc[kFixedChannels];
        forward_block<kFixedChannels, acc_t, policy>(taps, src, 0, 0, acc);
        for (int64_t c = 0; c < kFixedChannels; ++c) dst[c * channel_step] = acc[c];
      } else {
        int64_t c0 = 0;
        for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
          acc_t acc[kChannelBlock];
          forward_full_block<acc_t, policy>(taps, src, c0, acc);
          for (int64_t c = 0; c < kChannelBlock; ++c) dst[(c0 + c) * channel_step] = acc[c];
        }
        if (c0 < C) {
          acc_t acc[kChannelBlock];
          forward_block<0, acc_t, policy>(taps, src, c0, C - c0, acc);
          for (int64_t c = 0; c < C - c0; ++c) dst[(c0 + c) * channel_step] = acc[c];
        }
      }
    }
    if constexpr (kTransposeOut) {
      transpose(staged.data(), C, count, C, out + n * C * P + p0, P);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        scalar_t* run = out + (n * C + c) * P + p0;
        const acc_t* values = staged.data() + c * kPointGroup;
        for (int64_t j = 0; j < count; ++j) run[j] = static_cast<scalar_t>(values[j]);
      }
    }
  }
}

// Calls body(std::integral_constant<int, K>) with K the channel count when it
// is 1 to 4 and `specialise` holds, else 0 (run-time count). Only the bilinear
// loops are specialised, to bound the number of instantiations.
template <bool specialise, typename Body>
void dispatch_channels(int64_t channels, Body&& body) {
  if (!specialise) {
    body(std::integral_constant<int, 0>{});
    return;
  }
  switch (channels) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    case 4: body(std::integral_constant<int, 4>{}); break;
    default: body(std::integral_constant<int, 0>{}); break;
  }
}

template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_forward(const SamplerShape& s, const acc_t* source, Source& coords, scalar_t* out) {
  const int64_t total = s.batch * s.out_points;
  constexpr int taps = PointTaps<acc_t, Dims, mode>::kCount;
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, taps * s.channels));
  dispatch_channels<mode == Interpolation::Bilinear>(s.channels, [&](auto channels_tag) {
    constexpr int kFixed = decltype(channels_tag)::value;
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      sample_forward_range<scalar_t, acc_t, Dims, mode, policy, kFixed>(s, source, coords, out, begin, end);
    });
  });
}

// Backward over points [begin, end): scatter weight * grad_output into
// `grad_source` (channels-last, private to this range) and hand the gradient
// of each point's coordinates to the coordinate cursor, with `slot` naming the
// range so that sources which reduce (theta) keep per-range sums.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, int kFixedChannels,
          typename Source>
void sample_backward_range(const SamplerShape& s, const acc_t* source, Source& coords,
                           const scalar_t* grad_out, acc_t* grad_source, bool need_coords,
                           int64_t slot, int64_t begin, int64_t end) {
  const int64_t P = s.out_points;
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points * C;
  constexpr bool has_coord_grad = mode != Interpolation::Nearest;
  PointTaps<acc_t, Dims, mode> taps;
  auto cursor = coords.cursor(begin);
  PointCounter at(begin, P);
  // grad_output of a group of consecutive positions, read as contiguous runs per
  // channel and kept point-major: staged[j * C + c].
  std::vector<acc_t> staged(C * kPointGroup);
  constexpr bool kTiles = tiles_possible<acc_t, mode, Source>();
  using Tile = std::conditional_t<kTiles, PointTile<float, Dims>, int>;
  Tile tile;
  const bool tiles = kTiles && tiles_allowed<Dims>(s);
  for (int64_t i = begin; i < end;) {
    const int64_t n = at.n;
    const int64_t p0 = at.p;
    const int64_t count = std::min({kPointGroup, end - i, P - p0});
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      transpose(grad_out + n * C * P + p0, P, C, count, staged.data(), C);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* run = grad_out + (n * C + c) * P + p0;
        for (int64_t j = 0; j < count; ++j) staged[j * C + c] = static_cast<acc_t>(run[j]);
      }
    }
    const acc_t* src = source == nullptr ? nullptr : source + n * in_batch;
    acc_t* grad_src = grad_source == nullptr ? nullptr : grad_source + n * in_batch;
    bool tiled = false;
    if constexpr (kTiles) tiled = tiles && build_tile(tile, coords.points_at(i), count, s, need_coords);
    for (int64_t j = 0; j < count; ++j, ++i, at.advance(), cursor.advance()) {
      next_point_taps<policy>(taps, tiled, tile, j, C, need_coords, cursor, s);
      const acc_t* g = staged.data() + j * C;
      acc_t grad_xyz[Dims] = {};
      if constexpr (kFixedChannels > 0) {
        backward_block<kFixedChannels, acc_t, Dims, has_coord_grad>(taps, src, grad_src, g, 0, 0, need_coords,
                                                                    grad_xyz);
      } else {
        int64_t c0 = 0;
        for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
          backward_full_block<acc_t, Dims, has_coord_grad>(taps, src, grad_src, g + c0, c0, need_coords, grad_xyz);
        }
        if (c0 < C) {
          backward_block<0, acc_t, Dims, has_coord_grad>(taps, src, grad_src, g + c0, c0, C - c0, need_coords,
                                                         grad_xyz);
        }
      }
      if (need_coords) cursor.store_grad(slot, grad_xyz);
    }
  }
}

// How many private copies of the input gradient to keep: one per thread, as
// long as they fit in a memory budget; fewer copies means fewer threads.
// The budget is a small multiple of the gradient (or 64 MiB for small ones),
// whatever the thread count: one copy per thread grew with the machine
// (64 threads: 64 gradients of extra memory, where torch needs none).
inline int64_t private_copies(int64_t total_points, int64_t grad_bytes, bool need_input_grad) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t copies = std::min<int64_t>(threads, std::max<int64_t>(1, total_points / 256));
  if (need_input_grad && grad_bytes > 0) {
    constexpr int64_t kMaxCopiesOfAnyGradient = 4;
    constexpr int64_t kSmallBudgetBytes = int64_t(64) << 20;
    copies = std::min<int64_t>(copies, std::max<int64_t>(kMaxCopiesOfAnyGradient, kSmallBudgetBytes / grad_bytes));
  }
  return copies;
}

// Runs the backward in `copies` contiguous ranges, each with its own slice of
// `private_grads` (copies x N x in_points x C, zeroed), in parallel.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_backward(const SamplerShape& s, const acc_t* source, Source& coords, const scalar_t* grad_out,
                     acc_t* private_grads, bool need_coords, int64_t copies) {
  const int64_t total = s.batch * s.out_points;
  const int64_t per_copy = s.batch * s.in_points * s.channels;
  dispatch_channels<mode == Interpolation::Bilinear>(s.channels, [&](auto channels_tag) {
    constexpr int kFixed = decltype(channels_tag)::value;
    at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t begin = total * r / copies;
        const int64_t end = total * (r + 1) / copies;
        acc_t* grads = private_grads == nullptr ? nullptr : private_grads + r * per_copy;
        sample_backward_range<scalar_t, acc_t, Dims, mode, policy, kFixed>(s, source, coords, grad_out, grads,
                                                                           need_coords, r, begin, end);
      }
    });
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
