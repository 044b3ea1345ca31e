// Grid coordinates computed on the fly from theta: grid[n, p] = theta[n] @ [x, y, (z,) 1]
// where x, y, z are the base grid coordinates of output position p.
// Used by the CPU affine_grid and fused affine_grid_sample kernels.
#pragma once

#include <vector>

#include "../grid_sample_math.h"

namespace attnkernels {
namespace cpu {

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

  void base_of(int64_t p, acc_t* b) const {
    int64_t rest = p;
    for (int a = 0; a < Dims; ++a) {
      b[a] = base[a][rest % out_size[a]];
      rest /= out_size[a];
    }
  }

  void load(int64_t n, int64_t p, acc_t* xyz) const {
    acc_t b[Dims];
    base_of(p, b);
    const acc_t* t = theta + n * Dims * kCols;
    for (int r = 0; r < Dims; ++r) {
      acc_t v = t[r * kCols + Dims];
      for (int a = 0; a < Dims; ++a) v += t[r * kCols + a] * b[a];
      xyz[r] = v;
    }
  }

  void store_grad(int64_t slot, int64_t n, int64_t p, const acc_t* grad) {
    acc_t b[Dims];
    base_of(p, b);
    double* g = grad_theta.data() + (slot * batch + n) * Dims * kCols;
    for (int r = 0; r < Dims; ++r) {
      for (int a = 0; a < Dims; ++a) g[r * kCols + a] += double(grad[r]) * double(b[a]);
      g[r * kCols + Dims] += double(grad[r]);
    }
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

}  // namespace cpu
}  // namespace attnkernels
