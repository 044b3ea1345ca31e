// The taps of one sampling point (the tensor product of its axes' taps, with
// their weights and derivatives), and the counter that walks the flattened
// (batch, output position) range: what the CPU sampling loops
// (sampler_loops.h) evaluate per point.
#pragma once

#include "../cpu_isa.h"
#include <cstdint>

#include "../grid_sample_math.h"
#include "../sampler_shape.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

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

  // Lane `lane` of a tile built by PointTile (bilinear only): the same taps as
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

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
