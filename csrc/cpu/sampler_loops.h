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
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../sampler_shape.h"
#include "channel_blocks.h"
#include "channels_last_layout.h"
#include "point_taps.h"
#include "point_tile.h"
#include "scratch_memory.h"
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
// into `tile` (with d weight / d coordinate when `with_dweight`, with the
// bordered quad indices when `with_quads`); false when the tile path declines them.
template <int Dims>
bool build_tile(PointTile<float, Dims>& tile, const float* points, int64_t count, const SamplerShape& s,
                bool with_dweight, bool with_quads = false) {
#if defined(__AVX512F__) || defined(__AVX2__)
  auto build = [&](auto border_tag, auto dweight_tag, auto quads_tag) {
    constexpr bool kBorder = decltype(border_tag)::value;
    constexpr bool kDweight = decltype(dweight_tag)::value;
    constexpr bool kQuads = decltype(quads_tag)::value;
#if defined(__AVX512F__)
    return tile.template build_from_points_avx512<kBorder, kDweight, kQuads>(points, count, s);
#else
    return build_from_points_avx2<kBorder, kDweight, kQuads>(tile, points, count, s);
#endif
  };
  auto with_flags = [&](auto border_tag, auto dweight_tag) {
    return with_quads ? build(border_tag, dweight_tag, std::true_type{})
                      : build(border_tag, dweight_tag, std::false_type{});
  };
  const bool border = s.padding == Padding::Border;
  if (with_dweight) {
    return border ? with_flags(std::true_type{}, std::true_type{}) : with_flags(std::false_type{}, std::true_type{});
  }
  return border ? with_flags(std::true_type{}, std::false_type{}) : with_flags(std::false_type{}, std::false_type{});
#else
  (void)with_quads;
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
  AlignedVector<acc_t> staged(C * kPointGroup);
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
  AlignedVector<acc_t> staged(C * kPointGroup);
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
        ChannelVector<acc_t> coord_sums[Dims] = {};
        int64_t c0 = 0;
        for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
          backward_full_block<acc_t, Dims, has_coord_grad>(taps, src, grad_src, g + c0, c0, need_coords, coord_sums);
        }
        if (has_coord_grad && need_coords && c0 > 0) {
          for (int a = 0; a < Dims; ++a) grad_xyz[a] = tree_sum<acc_t>(coord_sums[a]);
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

// The memory the private copies of an input gradient of `grad_bytes` may
// take: a small multiple of the gradient (or 64 MiB for small ones), whatever
// the thread count (one whole copy per thread grew with the machine: 64
// threads, 64 gradients of extra memory, where torch needs none).
inline int64_t private_budget_bytes(int64_t grad_bytes) {
  constexpr int64_t kMaxCopiesOfAnyGradient = 4;
  constexpr int64_t kSmallBudgetBytes = int64_t(64) << 20;
  return std::max<int64_t>(kMaxCopiesOfAnyGradient * grad_bytes, kSmallBudgetBytes);
}

// How many whole private copies of the input gradient to keep: one per
// thread, as long as they fit in private_budget_bytes; fewer copies means
// fewer threads.
inline int64_t private_copies(int64_t total_points, int64_t grad_bytes, bool need_input_grad) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t copies = std::min<int64_t>(threads, std::max<int64_t>(1, total_points / 256));
  if (need_input_grad && grad_bytes > 0) {
    copies = std::min<int64_t>(copies, std::max<int64_t>(1, private_budget_bytes(grad_bytes) / grad_bytes));
  }
  return copies;
}

// Whether `copies` contiguous ranges of the batch's points (range r: [total r / copies,
// total (r + 1) / copies)) hold whole batch items: then no two ranges scatter into the same
// item, and they can share one gradient buffer (as torch's kernels, which split by item).
inline bool ranges_hold_whole_items(int64_t batch, int64_t copies) { return batch % copies == 0; }

// The input positions that the points [begin, end) can scatter into: the
// planes (of the faster axes) that their taps along the slowest input axis
// reach, one plane of margin either side, as whole reduction tiles. Only the
// lowest coordinate in the first batch item and the highest in the last one
// are needed: with zeros or border padding a tap's index never decreases as
// the coordinate grows. A NaN coordinate counts as both infinities (border
// padding puts its taps on the first or the last plane); with reflection, and
// where a bound's taps all fall outside the input, the span takes the whole item.
template <typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
ScatterSpan scatter_span(const SamplerShape& s, Source& coords, int64_t begin, int64_t end) {
  if (end <= begin) return {};
  constexpr acc_t kInfinity = std::numeric_limits<acc_t>::infinity();
  const int64_t slow = s.in_size[Dims - 1];
  const int64_t plane = s.in_points / slow;
  const int64_t first_item = begin / s.out_points;
  const int64_t last_item = (end - 1) / s.out_points;
  acc_t lowest = kInfinity;    // in first_item
  acc_t highest = -kInfinity;  // in last_item
  auto cursor = coords.cursor(begin);
  PointCounter at(begin, s.out_points);
  for (int64_t i = begin; i < end; ++i, at.advance(), cursor.advance()) {
    acc_t xyz[Dims];
    cursor.load(xyz);
    const acc_t c = xyz[Dims - 1];
    const bool nan = std::isnan(c);
    if (at.n == first_item) lowest = nan ? -kInfinity : std::min(lowest, c);
    if (at.n == last_item) highest = nan ? kInfinity : std::max(highest, c);
  }
  int64_t first = 0;        // index along the slowest axis, in first_item
  int64_t last = slow - 1;  // in last_item
  if (s.padding != Padding::Reflection) {
    constexpr int K = sampling::TapsPerAxis<mode>::value;
    const auto low_taps = sampling::axis_taps<mode, policy>(lowest, slow, s.padding, s.align_corners);
    const auto high_taps = sampling::axis_taps<mode, policy>(highest, slow, s.padding, s.align_corners);
    for (int k = K - 1; k >= 0; --k) {
      if (low_taps.valid[k]) first = low_taps.index[k];
    }
    for (int k = 0; k < K; ++k) {
      if (high_taps.valid[k]) last = high_taps.index[k];
    }
  }
  const int64_t lo = std::max<int64_t>(first_item * slow + first - 1, 0) * plane;
  const int64_t hi = std::min<int64_t>(last_item * slow + last + 2, s.batch * slow) * plane;
  return tile_aligned_span(lo, hi, s.in_points);
}

// Splits the points into `copies` contiguous ranges and gives each the span
// of input positions it scatters into, stored one after the other.
template <typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
std::vector<ScatterSpan> scatter_spans(const SamplerShape& s, Source& coords, int64_t copies) {
  const int64_t total = s.batch * s.out_points;
  std::vector<ScatterSpan> spans(copies);
  at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      spans[r] = scatter_span<acc_t, Dims, mode, policy>(s, coords, total * r / copies, total * (r + 1) / copies);
    }
  });
  int64_t offset = 0;
  for (ScatterSpan& span : spans) {
    span.offset = offset;
    offset += (span.end - span.begin) * s.channels;
  }
  return spans;
}

// The private copies of the input gradient for the backward: one per range
// of points, each holding only the span of the input its points reach; one
// range per thread when the spans together fit in private_budget_bytes, else
// fewer (halving), down to the whole copies the budget allows. Spans keep the
// memory, the zeroing and the reduction small: for a 16-frame video under an
// affine grid near the identity, 2 ranges span 20-24 of the 32 frames two
// whole copies hold, 16 ranges 83-110 of 256.
template <typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
std::vector<ScatterSpan> plan_private_grads(const SamplerShape& s, Source& coords) {
  const int64_t total = s.batch * s.out_points;
  const int64_t grad_bytes = s.batch * s.in_points * s.channels * int64_t(sizeof(acc_t));
  const int64_t whole_copies = private_copies(total, grad_bytes, true);
  int64_t copies = private_copies(total, grad_bytes, false);
  while (copies > whole_copies) {
    std::vector<ScatterSpan> spans = scatter_spans<acc_t, Dims, mode, policy>(s, coords, copies);
    if (span_elements(spans, s.channels) * int64_t(sizeof(acc_t)) <= private_budget_bytes(grad_bytes)) return spans;
    copies = std::max(whole_copies, copies / 2);
  }
  return scatter_spans<acc_t, Dims, mode, policy>(s, coords, whole_copies);  // at most whole copies: in the budget
}

// Runs the backward in spans.size() contiguous ranges of points, in parallel,
// each scattering into its own span of `private_grads` (laid out as `spans`
// say; zeroed here by the range that owns it).
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, typename Source>
void sample_backward(const SamplerShape& s, const acc_t* source, Source& coords, const scalar_t* grad_out,
                     acc_t* private_grads, const std::vector<ScatterSpan>& spans, bool need_coords) {
  const int64_t total = s.batch * s.out_points;
  const int64_t copies = static_cast<int64_t>(spans.size());
  dispatch_channels<mode == Interpolation::Bilinear>(s.channels, [&](auto channels_tag) {
    constexpr int kFixed = decltype(channels_tag)::value;
    at::parallel_for(0, copies, 1, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t begin = total * r / copies;
        const int64_t end = total * (r + 1) / copies;
        acc_t* grads = nullptr;
        if (private_grads != nullptr) {
          const ScatterSpan& span = spans[r];
          std::fill(private_grads + span.offset, private_grads + span.offset + (span.end - span.begin) * s.channels,
                    acc_t(0));
          // Indexed by absolute input position: only positions inside the span are ever touched.
          grads = private_grads + span.offset - span.begin * s.channels;
        }
        sample_backward_range<scalar_t, acc_t, Dims, mode, policy, kFixed>(s, source, coords, grad_out, grads,
                                                                           need_coords, r, begin, end);
      }
    });
  });
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
