// Fused affine_grid + grid_sample on the CPU: each output position's sampling
// point is computed from theta on the fly, so the grid is never stored. The
// backward reduces the gradient to theta per thread, then across threads.
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
#include "affine_coords.h"
#include "affine_rows.h"
#include "channels_last_layout.h"
#include "planar_sampler.h"
#include "sampler_loops.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h
namespace {

// Whether the points-vectorised row path (affine_rows.h) serves this call.
template <typename acc_t>
bool row_path_eligible(const at::Tensor& theta_acc, const SamplerShape& s, int64_t dims, int64_t interpolation) {
  bool eligible = false;
  dispatch_dims(dims, [&](auto dims_tag) {
    eligible = affine_rows_eligible<acc_t, decltype(dims_tag)::value>(theta_acc.const_data_ptr<acc_t>(), s,
                                                                      interpolation);
  });
  return eligible;
}

// Whether float16 and bfloat16 inputs on the row path take the float32 kernels on float32 copies
// of their tensors: the vector tiles and the pixel quads read float32 only, and 16-bit inputs would
// otherwise run on the scalar tiles, 1.3-2.5x slower than widening, running the float32 kernel and
// rounding the result (AMD Zen 4, both vector variants). The values are those of the 16-bit path, which
// computes in float32 too and rounds once at the end.
template <typename scalar_t>
constexpr bool kRowPathWidens =
#if defined(__AVX512F__) || defined(ATTNKERNELS_TILES_AVX2)
    std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
#else
    false;
#endif

// Calls body(dims, border) with both as compile-time constants.
template <typename Body>
void run_rows(int64_t dims, Padding padding, Body&& body) {
  const bool border = padding == Padding::Border;
  dispatch_dims(dims, [&](auto dims_tag) {
    if (border) body(dims_tag, std::true_type{});
    else body(dims_tag, std::false_type{});
  });
}

}  // namespace

// The entry points (cpu_kernels.h).
at::Tensor affine_grid_sample_cpu(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef size,
                                  int64_t interpolation, int64_t padding, bool align_corners) {
  check_affine_grid_sample_args(input, theta, size, interpolation, padding);
  at::Tensor out = at::empty(size, input.options());
  if (out.numel() == 0) return out;
  const SamplerShape s = affine_grid_sample_shape(input, size, padding, align_corners);
  const int64_t dims = input.dim() - 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor theta_acc = theta.to(acc_type).contiguous();
    if (s.channels <= affine_rows_forward_most_channels(dims) &&
        row_path_eligible<acc_t>(theta_acc, s, dims, interpolation)) {
      if constexpr (kRowPathWidens<scalar_t>) {
        const at::Tensor widened =
            input.to(input.options().dtype(at::kFloat), false, false, at::MemoryFormat::Contiguous);
        out.copy_(affine_grid_sample_cpu(widened, theta_acc, size, interpolation, padding, align_corners));
        return;
      }
      const at::Tensor planar = input.contiguous();
      run_rows(dims, s.padding, [&](auto dims_tag, auto border_tag) {
        constexpr int D = decltype(dims_tag)::value;
        AffineCoords<acc_t, D> coords(theta_acc.const_data_ptr<acc_t>(), s.batch, s.out_size, align_corners, 0);
        at::Tensor quads;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (forward_reads_quads<D>(s)) {
            quads = packed_quads<D>(s, planar);
          }
        }
        affine_rows_forward<scalar_t, acc_t, D, decltype(border_tag)::value>(
            s, planar.const_data_ptr<scalar_t>(), coords, out.mutable_data_ptr<scalar_t>(),
            quads.defined() ? quads.const_data_ptr<float>() : nullptr);
      });
      return;
    }
    const at::Tensor source = channels_last_source<scalar_t, acc_t>(input);
    dispatch_mode(interpolation, [&](auto mode_tag) {
      constexpr Interpolation mode = decltype(mode_tag)::value;
      dispatch_dims(dims, [&](auto dims_tag) {
        constexpr int D = decltype(dims_tag)::value;
        AffineCoords<acc_t, D> coords(theta_acc.const_data_ptr<acc_t>(), s.batch, s.out_size, align_corners, 0);
        sample_forward<scalar_t, acc_t, D, mode, nan_policy_for<D>()>(s, source.const_data_ptr<acc_t>(), coords,
                                                                      out.mutable_data_ptr<scalar_t>());
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& theta,
                                                                   at::IntArrayRef size, int64_t interpolation,
                                                                   int64_t padding, bool align_corners,
                                                                   std::array<bool, 2> output_mask) {
  check_affine_grid_sample_args(input, theta, size, interpolation, padding);
  check_affine_grid_sample_grad_output(grad_output, input, size);
  const bool need_input = output_mask[0];
  const bool need_theta = output_mask[1];
  const int64_t dims = input.dim() - 2;
  const SamplerShape s = affine_grid_sample_shape(input, size, padding, align_corners);
  const int64_t total = s.batch * s.out_points;

  at::Tensor grad_input;
  at::Tensor grad_theta;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t in_elems = s.batch * s.in_points * s.channels;
    const at::Tensor theta_acc = theta.to(acc_type).contiguous();
    grad_theta = at::zeros(theta.sizes(), theta.options());
    // fp32 with 3 or 4 channels: the row path's private gradients in the quad layout (pixel_quads.h).
    const bool quad_layout = std::is_same_v<scalar_t, float> && (dims == 2 ? quads_apply<2>(s) : quads_apply<3>(s));
    const int64_t grad_elems =
        quad_layout ? (dims == 2 ? quad_buffer_size<2>(s) : quad_buffer_size<3>(s)) : in_elems;
    const int64_t copies = private_copies(total, grad_elems * int64_t(sizeof(acc_t)), need_input);
    if (total > 0 && s.channels > 0 && row_path_eligible<acc_t>(theta_acc, s, dims, interpolation)) {
      if constexpr (kRowPathWidens<scalar_t>) {
        // Copies in the tensors' own layouts: the input's decides the gradient's.
        auto [widened_grad_input, widened_grad_theta] =
            affine_grid_sample_backward_cpu(grad_output.to(at::kFloat), input.to(at::kFloat), theta_acc, size,
                                            interpolation, padding, align_corners, output_mask);
        if (need_input) grad_input = widened_grad_input.to(input.scalar_type());
        if (need_theta) grad_theta = widened_grad_theta.to(theta.scalar_type());
        return;
      }
      const at::Tensor planar = input.contiguous();
      const at::Tensor go = grad_output.contiguous();
      const bool shared_buffer = ranges_hold_whole_items(s.batch, copies);
      const int64_t buffers = shared_buffer ? 1 : copies;
      at::Tensor private_grads =
          need_input ? at::zeros({buffers * grad_elems}, input.options().dtype(acc_type)) : at::Tensor();
      run_rows(dims, s.padding, [&](auto dims_tag, auto border_tag) {
        constexpr int D = decltype(dims_tag)::value;
        AffineCoords<acc_t, D> coords(theta_acc.const_data_ptr<acc_t>(), s.batch, s.out_size, align_corners,
                                      copies);
        // The quads are read only for the theta gradient.
        at::Tensor quads;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (quad_layout && need_theta) {
            quads = packed_quads<D>(s, planar);
          }
        }
        affine_rows_backward<scalar_t, acc_t, D, decltype(border_tag)::value>(
            s, planar.const_data_ptr<scalar_t>(), coords, go.const_data_ptr<scalar_t>(),
            need_input ? private_grads.mutable_data_ptr<acc_t>() : nullptr, need_theta, copies, quad_layout,
            quads.defined() ? quads.const_data_ptr<float>() : nullptr, shared_buffer);
        if (need_theta) coords.reduce_grad(copies, grad_theta.mutable_data_ptr<scalar_t>());
      });
      if (need_input && quad_layout) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          grad_input = dims == 2
                           ? reduce_quad_private_grads<float, 2>(private_grads.const_data_ptr<float>(), buffers, s, input)
                           : reduce_quad_private_grads<float, 3>(private_grads.const_data_ptr<float>(), buffers, s, input);
        }
      } else if (need_input && scatter_channels_last(s.channels)) {
        grad_input = reduce_private_grads<scalar_t>(private_grads.const_data_ptr<acc_t>(), buffers, input, s);
      } else if (need_input) {
        grad_input = reduce_planar_private_grads<scalar_t>(private_grads.const_data_ptr<acc_t>(), buffers, input);
      }
      return;
    }
    // The private copies of the input gradient (see plan_private_grads); no span holds a
    // position when nothing is sampled, and the reduction gives zeros there.
    std::vector<ScatterSpan> spans;
    at::Tensor private_grads;
    if (total > 0 && s.channels > 0) {
      // The input values are only read for the coordinate gradient.
      const at::Tensor source =
          need_theta && interpolation != 1 ? channels_last_source<scalar_t, acc_t>(input) : at::Tensor();
      const acc_t* source_ptr = source.defined() ? source.const_data_ptr<acc_t>() : nullptr;
      const at::Tensor go = grad_output.contiguous();
      dispatch_mode(interpolation, [&](auto mode_tag) {
        constexpr Interpolation mode = decltype(mode_tag)::value;
        dispatch_dims(dims, [&](auto dims_tag) {
          constexpr int D = decltype(dims_tag)::value;
          constexpr NanPolicy policy = nan_policy_for<D>();
          // One slot of theta's gradient per range of points: at most one range per thread.
          const int64_t slots = private_copies(total, 0, false);
          AffineCoords<acc_t, D> coords(theta_acc.const_data_ptr<acc_t>(), s.batch, s.out_size, align_corners, slots);
          if (need_input) {
            spans = plan_private_grads<acc_t, D, mode, policy>(s, coords);
            private_grads = at::empty({span_elements(spans, s.channels)}, input.options().dtype(acc_type));
          } else {
            spans.resize(slots);
          }
          sample_backward<scalar_t, acc_t, D, mode, policy>(
              s, source_ptr, coords, go.const_data_ptr<scalar_t>(),
              need_input ? private_grads.mutable_data_ptr<acc_t>() : nullptr, spans, need_theta);
          if (need_theta) coords.reduce_grad(static_cast<int64_t>(spans.size()), grad_theta.mutable_data_ptr<scalar_t>());
        });
      });
    }
    if (need_input) {
      const acc_t* buffer = private_grads.defined() ? private_grads.const_data_ptr<acc_t>() : nullptr;
      grad_input = reduce_private_grads<scalar_t>(buffer, spans, input, s);
    }
  });
  if (!need_input) grad_input = at::empty({0}, input.options());
  if (!need_theta) grad_theta = at::empty({0}, theta.options());
  return {grad_input, grad_theta};
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
