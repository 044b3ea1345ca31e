// Grid coordinates computed on the fly from theta: grid[n, p] = theta[n] @ [x, y, (z,) 1]
// where x, y, z are the base grid coordinates of output position p.
// Used by the CPU affine_grid and fused affine_grid_sample kernels.
#pragma once

#include "../cpu_isa.h"
#include <vector>

#include "../grid_sample_math.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

template <typename acc_t, int Dims>
struct AffineCoords {
  const acc_t* theta;  // (N, Dims, Dims + 1), contiguous
  int64_t out_size[3];
  std::vector<acc_t> base[Dims];  // base coordinate of each position, per axis
  // Gradient of theta, one (N, Dims, Dims + 1) block of doubles per slot.
  std::vector<double> grad_theta;
  int64_t batch;

  static constexpr int kCols = Dims + 1;

  AffineCoords(const acc_t* theta_, int64_t batch_, const int64_t* out_size_, bool align_corners, int64_t slots)
      : theta(theta_), batch(batch_) {
    for (int a = 0; a < 3; ++a) out_size[a] = a < Dims ? out_size_[a] : 1;
    for (int a = 0; a < Dims; ++a) {
      base[a].resize(out_size[a]);
      for (int64_t i = 0; i < out_size[a]; ++i) {
        base[a][i] = sampling::base_coordinate<acc_t>(i, out_size[a], align_corners);
      }
    }
    grad_theta.assign(slots * batch * Dims * kCols, 0.0);
  }

  // Walks output positions in order, keeping per-axis counters instead of
  // dividing the flattened index at every point.
  struct Cursor {
    AffineCoords* owner;
    int64_t n;
    int64_t index[3];

    void load(acc_t* xyz) const {
      const acc_t* t = owner->theta + n * Dims * kCols;
      for (int r = 0; r < Dims; ++r) {
        acc_t v = t[r * kCols + Dims];
        for (int a = 0; a < Dims; ++a) v += t[r * kCols + a] * owner->base[a][index[a]];
        xyz[r] = v;
      }
    }
    void store_grad(int64_t slot, const acc_t* grad) {
      double* g = owner->grad_theta.data() + (slot * owner->batch + n) * Dims * kCols;
      for (int r = 0; r < Dims; ++r) {
        for (int a = 0; a < Dims; ++a) g[r * kCols + a] += double(grad[r]) * double(owner->base[a][index[a]]);
        g[r * kCols + Dims] += double(grad[r]);
      }
    }
    void advance() {
      for (int a = 0; a < Dims; ++a) {
        if (++index[a] < owner->out_size[a]) return;
        index[a] = 0;
      }
      ++n;
    }
  };

  // At flattened (batch, position) index `flat`.
  Cursor cursor(int64_t flat) {
    Cursor c{this, 0, {0, 0, 0}};
    const int64_t points = out_size[0] * out_size[1] * out_size[2];
    c.n = flat / points;
    int64_t rest = flat % points;
    for (int a = 0; a < Dims; ++a) {
      c.index[a] = rest % out_size[a];
      rest /= out_size[a];
    }
    return c;
  }

  // Sums the slots into `out` (N, Dims, Dims + 1).
  template <typename out_t>
  void reduce_grad(int64_t slots, out_t* out) const {
    const int64_t block = batch * Dims * kCols;
    for (int64_t i = 0; i < block; ++i) {
      double v = 0.0;
      for (int64_t s = 0; s < slots; ++s) v += grad_theta[s * block + i];
      out[i] = static_cast<out_t>(v);
    }
  }
};

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
