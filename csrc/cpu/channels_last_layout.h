// Layout conversions around the CPU sampling loops: the channels-last copy of
// the input that they read, and the reduction of their private input-gradient
// copies (channels-last) back to the gradient's layout.
#pragma once

#include "../cpu_isa.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../sampler_shape.h"
#include "transpose_tiles.h"

namespace attnkernels {
namespace cpu {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

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
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        transpose(in + n * C * S + p0, S, C, width, rows, C);
        continue;
      }
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

// `grad`, contiguous, as the input gradient: channels-last when gradient_channels_last(input).
inline at::Tensor in_gradient_layout(const at::Tensor& grad, const at::Tensor& input) {
  if (!gradient_channels_last(input)) return grad;
  // empty + copy_ rather than contiguous(format): that inline ATen function would be emitted out of line
  // in this variant's object only (tests/test_cpu_capability.py, csrc/cpu_isa.h).
  at::Tensor strided = at::empty(input.sizes(), input.options().memory_format(
      input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d));
  strided.copy_(grad);
  return strided;
}

// Sums the private copies (copies, N, C, in_points) into the input gradient, in
// the input's dtype (channels-last when gradient_channels_last(input)).
template <typename scalar_t, typename acc_t>
at::Tensor reduce_planar_private_grads(const acc_t* copies_ptr, int64_t copies, const at::Tensor& input) {
  at::Tensor grad = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
  sum_private_copies(copies_ptr, copies, grad.numel(), grad.mutable_data_ptr<scalar_t>());
  return in_gradient_layout(grad, input);
}

// Positions of the reduction's tiles: kReduceTile consecutive input positions
// of one batch item (the last tile of an item may be shorter).
constexpr int64_t kReduceTile = 16;

// The input positions [begin, end) (flattened n * in_points + p) that one
// private copy of the input gradient holds, channels-last, from element
// `offset` of the private buffer on. Spans start and end on tile boundaries,
// so that a tile lies wholly inside a span or wholly outside it.
struct ScatterSpan {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t offset = 0;
};

// [begin, end) widened to whole tiles; `points` positions per batch item.
inline ScatterSpan tile_aligned_span(int64_t begin, int64_t end, int64_t points) {
  if (end <= begin) return {};
  const int64_t first_item = begin / points;
  const int64_t last_item = (end - 1) / points;
  const int64_t first = first_item * points + (begin - first_item * points) / kReduceTile * kReduceTile;
  const int64_t last_in_item = end - last_item * points;  // 1 .. points
  const int64_t rounded = std::min(points, (last_in_item + kReduceTile - 1) / kReduceTile * kReduceTile);
  return {first, last_item * points + rounded, 0};
}

// `copies` spans that each cover every position, one after the other.
inline std::vector<ScatterSpan> whole_spans(int64_t copies, int64_t positions, int64_t channels) {
  std::vector<ScatterSpan> spans(copies);
  for (int64_t r = 0; r < copies; ++r) spans[r] = {0, positions, r * positions * channels};
  return spans;
}

// Elements of the private buffer that `spans` need.
inline int64_t span_elements(const std::vector<ScatterSpan>& spans, int64_t channels) {
  int64_t elements = 0;
  for (const ScatterSpan& span : spans) elements = std::max(elements, span.offset + (span.end - span.begin) * channels);
  return elements;
}

// Sums the private copies (each a channels-last span of input positions, see
// ScatterSpan) into the input gradient, in the input's dtype and in one pass
// that also transposes to (N, C, ...) unless the gradient is channels-last.
// Copies are summed in their order; a position no span holds gets zero.
template <typename scalar_t, typename acc_t>
at::Tensor reduce_private_grads(const acc_t* buffer, const std::vector<ScatterSpan>& spans, const at::Tensor& input,
                                const SamplerShape& s) {
  const bool channels_last = gradient_channels_last(input);
  const auto format = !channels_last      ? at::MemoryFormat::Contiguous
                      : input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                         : at::MemoryFormat::ChannelsLast3d;
  at::Tensor grad = at::empty(input.sizes(), input.options().memory_format(format));
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  const int64_t S = s.in_points;
  const int64_t C = s.channels;
  // Transpose (N, S, C) -> (N, C, S) in tiles of kReduceTile positions: the reads of a
  // tile stay in L1, and each channel's writes are one contiguous run.
  const int64_t tiles_per_item = (S + kReduceTile - 1) / kReduceTile;
  at::parallel_for(0, s.batch * tiles_per_item, 64, [&](int64_t begin, int64_t end) {
    std::vector<const acc_t*> rows(spans.size());
    acc_t tile[kReduceTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_item;
      const int64_t p0 = (t - n * tiles_per_item) * kReduceTile;
      const int64_t width = std::min(kReduceTile, S - p0);
      const int64_t position = n * S + p0;
      int64_t count = 0;
      for (const ScatterSpan& span : spans) {
        if (span.begin <= position && position < span.end) {
          rows[count++] = buffer + span.offset + (position - span.begin) * C;
        }
      }
      if (channels_last) {
        scalar_t* dst = out + position * C;
        for (int64_t i = 0; i < width * C; ++i) {
          acc_t v = count > 0 ? rows[0][i] : acc_t(0);
          for (int64_t r = 1; r < count; ++r) v += rows[r][i];
          dst[i] = static_cast<scalar_t>(v);
        }
        continue;
      }
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        if (count > 0) {
          transpose_sum(rows.data(), count, C, width, C, out + n * C * S + p0, S);  // copies summed in order
          continue;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < width; ++j) tile[j] = count > 0 ? rows[0][j * C + c] : acc_t(0);
        for (int64_t r = 1; r < count; ++r) {
          for (int64_t j = 0; j < width; ++j) tile[j] += rows[r][j * C + c];
        }
        scalar_t* dst = out + (n * C + c) * S + p0;
        for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<scalar_t>(tile[j]);
      }
    }
  });
  return grad;
}

// The same for `copies` private copies (copies, N, [D,] H, W, C) that each
// cover every position.
template <typename scalar_t, typename acc_t>
at::Tensor reduce_private_grads(const acc_t* copies_ptr, int64_t copies, const at::Tensor& input,
                                const SamplerShape& s) {
  return reduce_private_grads<scalar_t>(copies_ptr, whole_spans(copies, s.batch * s.in_points, s.channels), input, s);
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace cpu
}  // namespace attnkernels
