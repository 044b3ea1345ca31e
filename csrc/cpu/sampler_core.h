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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../grid_sample_math.h"
#include "point_tile.h"
#include "sampler_shape.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

constexpr int int_pow(int base, int exponent) {
  int result = 1;
  for (int i = 0; i < exponent; ++i) result *= base;
  return result;
}

// All taps of one point: the tensor product of its axes' taps.
template <typename acc_t, int Dims, Interpolation mode>
struct PointTaps {
  using value_type = acc_t;
  static constexpr int kDims = Dims;
  static constexpr int K = sampling::TapsPerAxis<mode>::value;
  static constexpr int kCount = int_pow(K, Dims);
  int64_t offset[kCount];  // of the tap's channel run within one batch item
  acc_t weight[kCount];
  acc_t dweight[kCount][Dims];  // d weight / d normalised coordinate, per axis
  bool valid[kCount];

  // Lane `lane` of a tile built by RowTile (bilinear only): the same taps as
  // build() gives for that point, with offsets scaled to channels-last runs.
  template <typename Tile>
  void load_lane(const Tile& tile, int lane, int64_t channels, bool with_dweight) {
    static_assert(Tile::kTaps == kCount, "a tile holds bilinear taps");
    for (int t = 0; t < kCount; ++t) {
      offset[t] = int64_t(tile.offset[t][lane]) * channels;
      weight[t] = tile.weight[t][lane];
      valid[t] = tile.valid[t][lane] != 0;
    }
    if (with_dweight) {
      for (int t = 0; t < kCount; ++t) {
        for (int a = 0; a < Dims; ++a) dweight[t][a] = tile.dweight[t][a][lane];
      }
    }
  }

  template <NanPolicy policy>
  void build(const acc_t* coords, const SamplerShape& s) {
    sampling::AxisTaps<acc_t, K> axes[Dims];
    for (int a = 0; a < Dims; ++a) {
      axes[a] = sampling::axis_taps<mode, policy>(coords[a], s.in_size[a], s.padding, s.align_corners);
    }
    const int64_t stride[3] = {s.channels, s.channels * s.in_size[0], s.channels * s.in_size[0] * s.in_size[1]};
    for (int t = 0; t < kCount; ++t) {
      int rest = t;
      int64_t off = 0;
      acc_t w = acc_t(1);
      bool ok = true;
      int k[Dims];
      for (int a = 0; a < Dims; ++a) {
        k[a] = rest % K;
        rest /= K;
        off += axes[a].index[k[a]] * stride[a];
        w *= axes[a].weight[k[a]];
        ok = ok && axes[a].valid[k[a]];
      }
      offset[t] = off;
      weight[t] = w;
      valid[t] = ok;
      for (int a = 0; a < Dims; ++a) {
        acc_t d = axes[a].dweight[k[a]];
        for (int b = 0; b < Dims; ++b) {
          if (b != a) d *= axes[b].weight[k[b]];
        }
        dweight[t][a] = d;
      }
    }
  }
};

// Iterates the flattened (batch, output position) range without a division
// per point.
struct PointCounter {
  int64_t n, p, points;
  PointCounter(int64_t index, int64_t points_) : n(index / points_), p(index % points_), points(points_) {}
  void advance() {
    if (++p == points) {
      p = 0;
      ++n;
    }
  }
};

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
    } else if (policy == NanPolicy::Planar && !std::isfinite(w)) {
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
    } else if (policy == NanPolicy::Planar && !std::isfinite(w)) {
      acc += w * ChannelVector<acc_t>{};  // torch's 4-D kernel: NaN here
    }
  }
  store_block(out, acc);
}

template <typename acc_t, int Dims, bool has_coord_grad, typename Taps>
inline void backward_full_block(const Taps& taps, const acc_t* src, acc_t* grad_src, const acc_t* g, int64_t c0,
                                bool need_coords, acc_t* grad_xyz) {
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
    for (int a = 0; a < Dims; ++a) {
      const ChannelVector<acc_t> product = direction[a] * grad;
      acc_t dot = acc_t(0);
      for (int64_t c = 0; c < kChannelBlock; ++c) dot += product[c];
      grad_xyz[a] += dot;
    }
  }
}

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
         s.in_points() <= RowTile<float, 2>::kMaxTilePoints;
}

// Builds the taps of the `count` points whose coordinates start at `points`
// into `tile` (with d weight / d coordinate when `with_dweight`); false when
// the tile path declines them.
template <int Dims>
bool build_tile(RowTile<float, Dims>& tile, const float* points, int64_t count, const SamplerShape& s,
                bool with_dweight) {
#if defined(__AVX512F__)
  const bool border = s.padding == Padding::Border;
  if (with_dweight) {
    return border ? tile.template build_from_points_avx512<true, true>(points, count, s)
                  : tile.template build_from_points_avx512<false, true>(points, count, s);
  }
  return border ? tile.template build_from_points_avx512<true, false>(points, count, s)
                : tile.template build_from_points_avx512<false, false>(points, count, s);
#elif defined(__AVX2__)
  const bool border = s.padding == Padding::Border;
  if (with_dweight) {
    return border ? tile.template build_from_points<true, true>(points, count, s)
                  : tile.template build_from_points<false, true>(points, count, s);
  }
  return border ? tile.template build_from_points<true, false>(points, count, s)
                : tile.template build_from_points<false, false>(points, count, s);
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
  const int64_t P = s.out_points();
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points() * C;
  PointTaps<acc_t, Dims, mode> taps;
  auto cursor = coords.cursor(begin);
  PointCounter at(begin, P);
  std::vector<acc_t> staged(C * kPointGroup);  // staged[c * kPointGroup + j]
  constexpr bool kTiles = tiles_possible<acc_t, mode, Source>();
  using Tile = std::conditional_t<kTiles, RowTile<float, Dims>, int>;
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
      acc_t* dst = staged.data() + j;
      if constexpr (kFixedChannels > 0) {
        acc_t acc[kFixedChannels];
        forward_block<kFixedChannels, acc_t, policy>(taps, src, 0, 0, acc);
        for (int64_t c = 0; c < kFixedChannels; ++c) dst[c * kPointGroup] = acc[c];
      } else {
        int64_t c0 = 0;
        for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
          acc_t acc[kChannelBlock];
          forward_full_block<acc_t, policy>(taps, src, c0, acc);
          for (int64_t c = 0; c < kChannelBlock; ++c) dst[(c0 + c) * kPointGroup] = acc[c];
        }
        if (c0 < C) {
          acc_t acc[kChannelBlock];
          forward_block<0, acc_t, policy>(taps, src, c0, C - c0, acc);
          for (int64_t c = 0; c < C - c0; ++c) dst[(c0 + c) * kPointGroup] = acc[c];
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* run = out + (n * C + c) * P + p0;
      const acc_t* values = staged.data() + c * kPointGroup;
      for (int64_t j = 0; j < count; ++j) run[j] = static_cast<scalar_t>(values[j]);
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
  const int64_t total = s.batch * s.out_points();
  constexpr int taps = PointTaps<acc_t, Dims, mode>::kCount;
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, taps * s.channels));
  dispatch_channels<mode == Interpolation::Bilinear>(s.channels, [&](auto channels_tag) {
    constexpr int kFixed = decltype(channels_tag)::value;
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      sample_forward_range<scalar_t, acc_t, Dims, mode, policy, kFixed>(s, source, coords, out, begin, end);
    });
  });
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

// Backward over points [begin, end): scatter weight * grad_output into
// `grad_source` (channels-last, private to this range) and hand the gradient
// of each point's coordinates to the coordinate cursor, with `slot` naming the
// range so that sources which reduce (theta) keep per-range sums.
template <typename scalar_t, typename acc_t, int Dims, Interpolation mode, NanPolicy policy, int kFixedChannels,
          typename Source>
void sample_backward_range(const SamplerShape& s, const acc_t* source, Source& coords,
                           const scalar_t* grad_out, acc_t* grad_source, bool need_coords,
                           int64_t slot, int64_t begin, int64_t end) {
  const int64_t P = s.out_points();
  const int64_t C = s.channels;
  const int64_t in_batch = s.in_points() * C;
  constexpr bool has_coord_grad = mode != Interpolation::Nearest;
  PointTaps<acc_t, Dims, mode> taps;
  auto cursor = coords.cursor(begin);
  PointCounter at(begin, P);
  // grad_output of a group of consecutive positions, read as contiguous runs per
  // channel and kept point-major: staged[j * C + c].
  std::vector<acc_t> staged(C * kPointGroup);
  constexpr bool kTiles = tiles_possible<acc_t, mode, Source>();
  using Tile = std::conditional_t<kTiles, RowTile<float, Dims>, int>;
  Tile tile;
  const bool tiles = kTiles && tiles_allowed<Dims>(s);
  for (int64_t i = begin; i < end;) {
    const int64_t n = at.n;
    const int64_t p0 = at.p;
    const int64_t count = std::min({kPointGroup, end - i, P - p0});
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* run = grad_out + (n * C + c) * P + p0;
      for (int64_t j = 0; j < count; ++j) staged[j * C + c] = static_cast<acc_t>(run[j]);
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
  const int64_t total = s.batch * s.out_points();
  const int64_t per_copy = s.batch * s.in_points() * s.channels;
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

// Calls `body` with the interpolation mode as a compile-time constant.
template <typename Body>
void dispatch_mode(int64_t mode, Body&& body) {
  switch (static_cast<Interpolation>(mode)) {
    case Interpolation::Bilinear:
      body(std::integral_constant<Interpolation, Interpolation::Bilinear>{});
      break;
    case Interpolation::Nearest:
      body(std::integral_constant<Interpolation, Interpolation::Nearest>{});
      break;
    case Interpolation::Bicubic:
      body(std::integral_constant<Interpolation, Interpolation::Bicubic>{});
      break;
    default:
      TORCH_CHECK(false, "attnkernels: interpolation must be 0 (bilinear), 1 (nearest) or 2 (bicubic), got ", mode);
  }
}

// The input as a channels-last contiguous tensor of the accumulation type:
// (N, C, [D,] H, W) -> (N, [D,] H, W, C). Free when it already is one; a
// contiguous input is transposed (and converted) in one tiled pass.
template <typename scalar_t, typename acc_t>
at::Tensor channels_last_source(const at::Tensor& input) {
  std::vector<int64_t> order = {0};
  for (int64_t d = 2; d < input.dim(); ++d) order.push_back(d);
  order.push_back(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  if (!input.is_contiguous() || input.size(1) == 1) {
    return input.to(acc_type).permute(order).contiguous();
  }
  const int64_t N = input.size(0);
  const int64_t C = input.size(1);
  const int64_t S = input.numel() / std::max<int64_t>(1, N * C);
  std::vector<int64_t> shape;
  for (int64_t d : order) shape.push_back(input.size(d));
  at::Tensor source = at::empty(shape, input.options().dtype(acc_type));
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  acc_t* out = source.mutable_data_ptr<acc_t>();
  constexpr int64_t kTile = 16;
  const int64_t tiles_per_item = (S + kTile - 1) / kTile;
  at::parallel_for(0, N * tiles_per_item, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_item;
      const int64_t p0 = (t - n * tiles_per_item) * kTile;
      const int64_t width = std::min(kTile, S - p0);
      acc_t* rows = out + (n * S + p0) * C;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* src = in + (n * C + c) * S + p0;
        for (int64_t j = 0; j < width; ++j) rows[j * C + c] = static_cast<acc_t>(src[j]);
      }
    }
  });
  return source;
}

// Whether the input gradient is returned channels-last: for a channels-last
// input that is not also contiguous (mirrored by the fake kernels).
inline bool gradient_channels_last(const at::Tensor& input) {
  const auto format = input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return !input.is_contiguous() && input.is_contiguous(format);
}

// out[i] = sum over r of copies_ptr[r * per_copy + i], in the output's dtype:
// private gradient copies whose layout is already the gradient's.
template <typename scalar_t, typename acc_t>
void sum_private_copies(const acc_t* copies_ptr, int64_t copies, int64_t per_copy, scalar_t* out) {
  at::parallel_for(0, per_copy, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t v = copies_ptr[i];
      for (int64_t r = 1; r < copies; ++r) v += copies_ptr[r * per_copy + i];
      out[i] = static_cast<scalar_t>(v);
    }
  });
}

// Sums the private copies (copies, N, [D,] H, W, C) into the input gradient,
// in the input's dtype and in one pass that also transposes to (N, C, ...)
// unless the gradient is channels-last.
template <typename scalar_t, typename acc_t>
at::Tensor reduce_private_grads(const acc_t* copies_ptr, int64_t copies, const at::Tensor& input,
                                const SamplerShape& s) {
  const bool channels_last = gradient_channels_last(input);
  const auto format = !channels_last      ? at::MemoryFormat::Contiguous
                      : input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                         : at::MemoryFormat::ChannelsLast3d;
  at::Tensor grad = at::empty(input.sizes(), input.options().memory_format(format));
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const int64_t S = s.in_points();
  const int64_t C = s.channels;
  const int64_t per_copy = s.batch * S * C;
  if (channels_last) {
    sum_private_copies(copies_ptr, copies, per_copy, out);
    return grad;
  }
  // Transpose (N, S, C) -> (N, C, S) in tiles of kTile positions: the reads of a
  // tile stay in L1, and each channel's writes are one contiguous run.
  constexpr int64_t kTile = 16;
  const int64_t tiles_per_item = (S + kTile - 1) / kTile;
  at::parallel_for(0, s.batch * tiles_per_item, 64, [&](int64_t begin, int64_t end) {
    acc_t tile[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_item;
      const int64_t p0 = (t - n * tiles_per_item) * kTile;
      const int64_t width = std::min(kTile, S - p0);
      const acc_t* rows = copies_ptr + (n * S + p0) * C;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < width; ++j) tile[j] = rows[j * C + c];
        for (int64_t r = 1; r < copies; ++r) {
          for (int64_t j = 0; j < width; ++j) tile[j] += rows[r * per_copy + j * C + c];
        }
        scalar_t* dst = out + (n * C + c) * S + p0;
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(tile[j]);
      }
    }
  });
  return grad;
}

inline void read_shape(const at::Tensor& input, SamplerShape& s) {
  s.batch = input.size(0);
  s.channels = input.size(1);
  const int64_t dims = input.dim() - 2;
  for (int64_t a = 0; a < dims; ++a) s.in_size[a] = input.size(input.dim() - 1 - a);
}


}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
