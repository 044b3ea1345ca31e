// Argument checks shared by every C++ backend of attnkernels::attention and
// attention_backward, so that a direct call to torch.ops.attnkernels.* fails
// with the same clear message on the CPU and on CUDA.
#pragma once

#include "cpu_isa.h"
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace attnkernels {
inline namespace ATTNKERNELS_CPU_ISA {  // see cpu_isa.h

// q (batch, q_heads, L, E), k (batch, kv_heads, S, E), v (batch, kv_heads, S, Ev);
// group = q_heads / kv_heads query heads share one key/value head (GQA).
struct AttentionShape {
  int64_t batch, q_heads, kv_heads, group, L, S, E, Ev;
};

inline AttentionShape attention_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attnkernels::attention: expected query, key and value of rank 4 (batch, heads, length, dim), got ",
              q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "attnkernels::attention: expected query, key and value to have the same batch size, got ", q.sizes(),
              ", ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), "attnkernels::attention: expected key and value to have the same number of "
              "heads, got ", k.size(1), " and ", v.size(1));
  // Zero heads everywhere is an empty attention, as in torch.
  TORCH_CHECK(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "attnkernels::attention: expected the ",
              "number of key and value heads (", k.size(1), ") to divide the number of query heads (", q.size(1), ")");
  TORCH_CHECK(k.size(3) == q.size(3), "attnkernels::attention: expected key's head dim (", k.size(3),
              ") to equal query's (", q.size(3), ")");
  TORCH_CHECK(v.size(2) == k.size(2), "attnkernels::attention: expected value's length (", v.size(2),
              ") to equal key's (", k.size(2), ")");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attnkernels::attention: expected query, key and value of one dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "attnkernels::attention: expected query, key and value on one device, got ", q.device(), ", ",
              k.device(), " and ", v.device());
  const int64_t group = k.size(1) > 0 ? q.size(1) / k.size(1) : 1;
  return AttentionShape{q.size(0), q.size(1), k.size(1), group, q.size(2), k.size(2), q.size(3), v.size(3)};
}

// The mask: (batch, q_heads, L, S) (broadcast views with stride 0 allowed), bool
// (true = attend) or of the accumulation dtype (added to the scores), on q's device.
inline void check_attention_mask(const std::optional<at::Tensor>& mask, const AttentionShape& shape,
                                 const at::Tensor& q, at::ScalarType accumulation) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.dim() == 4 && m.size(0) == shape.batch && m.size(1) == shape.q_heads && m.size(2) == shape.L &&
                  m.size(3) == shape.S,
              "attnkernels::attention: expected attn_mask of shape (", shape.batch, ", ", shape.q_heads, ", ", shape.L,
              ", ", shape.S, ") (broadcast views allowed), got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == accumulation,
              "attnkernels::attention: expected a bool attn_mask or one of dtype ", accumulation,
              " (the accumulation dtype), got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "attnkernels::attention: expected attn_mask on ", q.device(), ", got ",
              m.device());
}

inline void check_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attnkernels::attention: expected dropout_p in [0, 1), got ",
              dropout_p);
}

// The dropout seed as an integer (0 without dropout).
inline int64_t dropout_seed_of(const std::optional<at::Tensor>& dropout_seed, double dropout_p) {
  if (dropout_p <= 0) return 0;
  TORCH_CHECK(dropout_seed.has_value() && dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
              "attnkernels::attention: dropout_p > 0 needs a one-element int64 dropout_seed tensor");
  return dropout_seed->item<int64_t>();
}

}  // namespace ATTNKERNELS_CPU_ISA
}  // namespace attnkernels
