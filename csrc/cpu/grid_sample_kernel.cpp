// grid_sample on the CPU: forward and backward, 4-D and 5-D, every mode and
// padding, fp16/bf16/fp32/fp64 (half types accumulate in fp32).
// No FMA contraction in the sampling kernels: coordinates must round exactly
// as torch's do (a fused multiply-add moves huge coordinates by an ulp, and a
// reflected coordinate by a whole pixel).
#pragma GCC optimize("fp-contract=off")

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../cpu_isa.h"
#include "../sampling_checks.h"
#include "cpu_kernels.h"
#include "planar_sampler.h"
#include "channels_last_layout.h"
#include "sampler_loops.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h
namespace {

// Coordinates read from a stored grid (N, P, Dims), gradient written back to
// a grid-shaped buffer of the same layout.
template <typename acc_t, int Dims>
struct StoredGrid {
  const acc_t* grid;
  acc_t* grad_grid;
  int64_t points;

  struct Cursor {
    const StoredGrid* owner;
    int64_t offset;  // of the current point's coordinates
    void load(acc_t* xyz) const {
      for (int a = 0; a < Dims; ++a) xyz[a] = owner->grid[offset + a];
    }
    void store_grad(int64_t /*slot*/, const acc_t* g) {
      for (int a = 0; a < Dims; ++a) owner->grad_grid[offset + a] = g[a];
    }
    void advance() { offset += Dims; }
  };
  // At flattened (batch, position) index `index`.
  Cursor cursor(int64_t index) const { return {this, index * Dims}; }
  // The coordinates of the point at flattened index `index` and those after it.
  const acc_t* points_at(int64_t index) const { return grid + index * Dims; }
};

// The planar sampler reads fp32. fp16 and bf16 inputs (which the general loops also
// convert to fp32 before sampling) are served on fp32 copies, the results rounded back.
bool planar_dtype(const at::Tensor& input) {
  const at::ScalarType type = input.scalar_type();
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// x as contiguous fp32: x itself when it already is.
at::Tensor contiguous_float(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

// The backward of planar_sampler.h when it serves the call (fp32 or 16-bit, few
// channels, bilinear, zeros or border): sets both gradients (an unrequested one
// empty) and returns true.
bool try_planar_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid,
                         int64_t interpolation, const SamplerShape& s, bool need_input, bool need_grid,
                         at::Tensor& grad_input, at::Tensor& grad_grid) {
  const int64_t total = s.batch * s.out_points;
  if (!planar_dtype(input) || total == 0 || s.channels == 0 || !planar_applies(s, interpolation)) return false;
  const at::Tensor points = contiguous_float(grid);
  const at::Tensor planar = contiguous_float(input);
  const at::Tensor go = contiguous_float(grad_output);
  const int64_t in_elems = s.batch * s.channels * s.in_points;
  const int dims = int(input.dim()) - 2;
  const bool quad_layout = dims == 2 ? quads_apply<2>(s) : quads_apply<3>(s);
  const int64_t grad_elems = quad_layout ? (dims == 2 ? quad_buffer_size<2>(s) : quad_buffer_size<3>(s)) : in_elems;
  const int64_t copies = private_copies(total, grad_elems * int64_t(sizeof(float)), need_input);
  // No extra copies to zero and sum where the ranges share one buffer.
  const bool shared_buffer = ranges_hold_whole_items(s.batch, copies);
  const int64_t buffers = shared_buffer ? 1 : copies;
  // An fp32 planar gradient in one buffer is the input gradient itself.
  const bool direct = need_input && buffers == 1 && !quad_layout && input.scalar_type() == at::kFloat;
  at::Tensor private_grads;
  if (direct) {
    private_grads = at::zeros(input.sizes(), planar.options().memory_format(at::MemoryFormat::Contiguous));
  } else if (need_input) {
    private_grads = at::zeros({buffers * grad_elems}, planar.options());
  }
  grad_grid = need_grid ? at::empty(grid.sizes(), points.options()) : at::empty({0}, grid.options());
  dispatch_dims(dims, [&](auto dims_tag) {
    constexpr int D = decltype(dims_tag)::value;
    // The quads are read only for the coordinate gradient.
    at::Tensor quads;
    if (quad_layout && need_grid) {
      quads = packed_quads<D>(s, planar);
    }
    planar_backward<D, nan_policy_for<D>()>(s, planar.const_data_ptr<float>(), points.const_data_ptr<float>(),
                                            go.const_data_ptr<float>(),
                                            need_input ? private_grads.mutable_data_ptr<float>() : nullptr,
                                            need_grid ? grad_grid.mutable_data_ptr<float>() : nullptr, copies,
                                            quad_layout, quads.defined() ? quads.const_data_ptr<float>() : nullptr,
                                            shared_buffer);
  });
  grad_input = at::empty({0}, input.options());
  if (direct) {
    grad_input = in_gradient_layout(private_grads, input);
  } else if (need_input) {
    // Only planar_dtype's three types reach here.
    const auto reduce = [&](auto type_tag) {
      using scalar_t = decltype(type_tag);
      if (quad_layout) {
        return dims == 2 ? reduce_quad_private_grads<scalar_t, 2>(private_grads.const_data_ptr<float>(), buffers, s, input)
                         : reduce_quad_private_grads<scalar_t, 3>(private_grads.const_data_ptr<float>(), buffers, s, input);
      }
      return reduce_planar_private_grads<scalar_t>(private_grads.const_data_ptr<float>(), buffers, input);
    };
    switch (input.scalar_type()) {
      case at::kHalf: grad_input = reduce(at::Half{}); break;
      case at::kBFloat16: grad_input = reduce(at::BFloat16{}); break;
      default: grad_input = reduce(float{}); break;
    }
  }
  if (need_grid) grad_grid = grad_grid.to(grid.scalar_type());
  return true;
}

}  // namespace

// The entry points (cpu_kernels.h).
at::Tensor grid_sample_cpu(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                   int64_t padding, bool align_corners) {
  check_grid_sample_args(input, grid, interpolation, padding);
  const int64_t dims = input.dim() - 2;
  std::vector<int64_t> out_shape = {input.size(0), input.size(1)};
  for (int64_t d = 1; d <= dims; ++d) out_shape.push_back(grid.size(d));
  at::Tensor out = at::empty(out_shape, input.options());
  if (out.numel() == 0) return out;

  const SamplerShape s = grid_sample_shape(input, grid, padding, align_corners);
  if (planar_dtype(input) && planar_applies(s, interpolation)) {
    const at::Tensor planar = contiguous_float(input);
    const at::Tensor points = contiguous_float(grid);
    at::Tensor out_float = input.scalar_type() == at::kFloat ? out : at::empty(out_shape, planar.options());
    dispatch_dims(dims, [&](auto dims_tag) {
      constexpr int D = decltype(dims_tag)::value;
      at::Tensor quads;
      if (forward_reads_quads<D>(s)) {
        quads = packed_quads<D>(s, planar);
      }
      planar_forward<D, nan_policy_for<D>()>(s, planar.const_data_ptr<float>(), points.const_data_ptr<float>(),
                                             out_float.mutable_data_ptr<float>(),
                                             quads.defined() ? quads.const_data_ptr<float>() : nullptr);
    });
    if (!out_float.is_same(out)) out.copy_(out_float);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor source = channels_last_source<scalar_t, acc_t>(input);
    const at::Tensor grid_acc = grid.to(acc_type).contiguous();
    dispatch_mode(interpolation, [&](auto mode_tag) {
      constexpr Interpolation mode = decltype(mode_tag)::value;
      dispatch_dims(dims, [&](auto dims_tag) {
        constexpr int D = decltype(dims_tag)::value;
        StoredGrid<acc_t, D> coords{grid_acc.const_data_ptr<acc_t>(), nullptr, s.out_points};
        sample_forward<scalar_t, acc_t, D, mode, nan_policy_for<D>()>(s, source.const_data_ptr<acc_t>(), coords,
                                                                      out.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                            const at::Tensor& grid, int64_t interpolation,
                                                            int64_t padding, bool align_corners,
                                                            std::array<bool, 2> output_mask) {
  check_grid_sample_args(input, grid, interpolation, padding);
  check_grad_output(grad_output, input, grid);
  const bool need_input = output_mask[0];
  const bool need_grid = output_mask[1];
  const int64_t dims = input.dim() - 2;
  const SamplerShape s = grid_sample_shape(input, grid, padding, align_corners);
  const int64_t total = s.batch * s.out_points;

  at::Tensor grad_input;
  at::Tensor grad_grid;
  if (try_planar_backward(grad_output, input, grid, interpolation, s, need_input, need_grid, grad_input, grad_grid)) {
    return {grad_input, grad_grid};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor grad_grid_acc = need_grid ? at::zeros(grid.sizes(), grid.options().dtype(acc_type)) : at::Tensor();
    // The private copies of the input gradient (see plan_private_grads); no span holds a
    // position when nothing is sampled, and the reduction gives zeros there.
    std::vector<ScatterSpan> spans;
    at::Tensor private_grads;

    if (total > 0 && s.channels > 0) {
      // The input values are only read for the coordinate gradient.
      const at::Tensor source = need_grid && interpolation != 1 ? channels_last_source<scalar_t, acc_t>(input) : at::Tensor();
      const acc_t* source_ptr = source.defined() ? source.const_data_ptr<acc_t>() : nullptr;
      const at::Tensor grid_acc = grid.to(acc_type).contiguous();
      const at::Tensor go = grad_output.contiguous();
      acc_t* grad_grid_ptr = need_grid ? grad_grid_acc.mutable_data_ptr<acc_t>() : nullptr;
      dispatch_mode(interpolation, [&](auto mode_tag) {
        constexpr Interpolation mode = decltype(mode_tag)::value;
        dispatch_dims(dims, [&](auto dims_tag) {
          constexpr int D = decltype(dims_tag)::value;
          constexpr NanPolicy policy = nan_policy_for<D>();
          StoredGrid<acc_t, D> coords{grid_acc.const_data_ptr<acc_t>(), grad_grid_ptr, s.out_points};
          if (need_input) {
            spans = plan_private_grads<acc_t, D, mode, policy>(s, coords);
            private_grads = at::empty({span_elements(spans, s.channels)}, input.options().dtype(acc_type));
          } else {
            spans.resize(private_copies(total, 0, false));
          }
          sample_backward<scalar_t, acc_t, D, mode, policy>(
              s, source_ptr, coords, go.const_data_ptr<scalar_t>(),
              need_input ? private_grads.mutable_data_ptr<acc_t>() : nullptr, spans, need_grid);
        });
      });
    }
    if (need_input) {
      const acc_t* buffer = private_grads.defined() ? private_grads.const_data_ptr<acc_t>() : nullptr;
      grad_input = reduce_private_grads<scalar_t>(buffer, spans, input, s);
    }
    if (need_grid) grad_grid = grad_grid_acc.to(grid.scalar_type());
  });
  // The op's schema always returns two tensors: an unrequested gradient is empty.
  if (!need_input) grad_input = at::empty({0}, input.options());
  if (!need_grid) grad_grid = at::empty({0}, grid.options());
  return {grad_input, grad_grid};
}

std::string sampling_paths_cpu() {
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
  const auto how = [](const char* variable) {
    return path_choice_from_environment(variable) == PathChoice::Measure ? "measured" : "forced by " + std::string(variable);
  };
  const SamplerShape rgb = calibration_shape(1, 3, 8);  // a forward that could read quads
  std::string paths = std::string("3-4 channel fp32 forwards read ") +
                      (forward_reads_quads<2>(rgb) ? "pixel quads" : "gathers") + " (" +
                      how("ATTNKERNELS_PIXEL_QUADS") + ")";
#if defined(ATTNKERNELS_TILES_AVX2)
  paths += std::string("; gathers load ") + (pair_gathers_avx2() ? "x-neighbour pairs" : "single taps") + " (" +
           how("ATTNKERNELS_PAIR_GATHERS") + ")";
#else
  paths += "; gathers load x-neighbour pairs";
#endif
  return paths;
#else
  return "point by point (no vector tiles in this variant)";
#endif
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
