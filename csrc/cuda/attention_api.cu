// attnkernels::attention and attention_backward for CUDA tensors: argument
// checks, the layout the kernels need, and the choice of compiled kernel.
// Same semantics, outputs and empty-tensor conventions as
// csrc/cpu/attention_kernel.cpp; the kernels are in attention_forward.cuh and
// attention_backward.cuh.
//
// The kernels serve float16 and bfloat16 with head dims up to 256;
// attnkernels/attention.py declines the rest for the cuda backend with a
// reason, and these checks say the same to direct callers.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "../attention_checks.h"
#include "attention_kernels.h"
#include "cuda_kernels.h"

namespace attnkernels {
namespace cuda_attention {
namespace {

using Shape = AttentionShape;

// The shared checks, then what the CUDA kernels alone need.
Shape checked_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const Shape shape = attention_shape(q, k, v);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attnkernels::attention: the CUDA kernel takes float16 or bfloat16 inputs, got ", q.scalar_type(),
              "; use backend='triton' or backend='reference' for other dtypes");
  TORCH_CHECK(q.is_cuda(), "attnkernels::attention: expected query, key and value on a CUDA device, got ",
              q.device());
  TORCH_CHECK(forward_head_dim_bucket(q.size(3), v.size(3)) != 0, "attnkernels::attention: the CUDA kernel takes ",
              "head dims up to ", kMaxHeadDim, ", got E = ", q.size(3), " and Ev = ", v.size(3),
              "; use backend='triton' or backend='reference'");
  TORCH_CHECK(q.size(1) <= kMaxGridYZ && q.size(0) <= kMaxGridYZ,
              "attnkernels::attention: the CUDA kernel takes at most ", kMaxGridYZ,
              " batch entries and query heads (grid y and z), got ", q.sizes());
  TORCH_CHECK(q.size(2) <= kMaxSequence && k.size(2) <= kMaxSequence,
              "attnkernels::attention: the CUDA kernel takes sequences of at most ", kMaxSequence,
              " positions, got L = ", q.size(2), " and S = ", k.size(2));
  return shape;
}

// The layout the kernels read: head dim padded with zeros to a multiple of 8,
// contiguous in it, and every other stride a whole number of 16-byte chunks.
// Views that already qualify (e.g. (B, L, H, E) memory transposed) are used as they are.
at::Tensor kernel_layout(const at::Tensor& t) {
  const int64_t width = padded_head_dim(t.size(3));
  if (width != t.size(3)) return at::constant_pad_nd(t, {0, width - t.size(3)}, 0);
  const bool usable = t.stride(3) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return usable ? t : t.contiguous();
}

// The parameters shared by the forward and the backward.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const Shape& shape, double scale, bool is_causal,
                            double dropout_p, int64_t seed) {
  AttentionParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_l = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_s = v.stride(2);
  if (mask.has_value()) {
    p.mask = mask->const_data_ptr();
    p.mask_is_bool = mask->scalar_type() == at::kBool;
    p.mask_stride_b = mask->stride(0), p.mask_stride_h = mask->stride(1);
    p.mask_stride_l = mask->stride(2), p.mask_stride_s = mask->stride(3);
  }
  p.batch = static_cast<int>(shape.batch);
  p.q_heads = static_cast<int>(shape.q_heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.group = static_cast<int>(shape.group);
  p.L = shape.L;
  p.S = shape.S;
  p.E = static_cast<int>(q.size(3));  // padded
  p.Ev = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = is_causal;
  p.dropout = dropout_p > 0;
  if (p.dropout) {
    p.dropout_key = dropout_key(seed);
    p.dropout_threshold = dropout_threshold(dropout_p);
    p.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return p;
}

// The kernels' shared memory (attention_launch.h) must fit the GPU's per-block limit: 227 KiB on
// sm_90, 163 KiB on sm_80, but 99 KiB on sm_86 / sm_89, where the 256 bucket's backward does not fit.
void check_shared_memory(int bytes, int bucket, const char* what) {
  const int limit = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  TORCH_CHECK(bytes <= limit, "attnkernels::attention: the CUDA ", what, " kernel for head dims up to ", bucket,
              " needs ", bytes, " bytes of shared memory per block, and this GPU allows ", limit,
              "; use backend='triton' or backend='reference'");
}

// Calls fn(T{}, std::integral_constant<int, D>{}) for the input dtype and head-dim bucket.
template <typename Fn>
void dispatch_kernel(at::ScalarType dtype, int bucket, Fn fn) {
  auto with_bucket = [&](auto type_tag) {
    switch (bucket) {
      case 64: return fn(type_tag, std::integral_constant<int, 64>{});
      case 128: return fn(type_tag, std::integral_constant<int, 128>{});
      case 256: return fn(type_tag, std::integral_constant<int, 256>{});
      default: TORCH_CHECK(false, "attnkernels::attention: no CUDA kernel for head-dim bucket ", bucket);
    }
  };
  if (dtype == at::kHalf) {
    with_bucket(__half{});
  } else {
    with_bucket(__nv_bfloat16{});
  }
}

at::Tensor narrow_head_dim(const at::Tensor& t, int64_t width) {
  return t.size(-1) == width ? t : t.narrow(-1, 0, width).contiguous();
}

}  // namespace

// The entry points (cuda_kernels.h).
std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, const std::optional<at::Tensor>& attn_mask,
                                                  double dropout_p, bool is_causal, double scale,
                                                  const std::optional<at::Tensor>& dropout_seed) {
  const Shape shape = checked_shape(query, key, value);
  check_dropout(dropout_p);
  check_attention_mask(attn_mask, shape, query, at::kFloat);
  TORCH_CHECK(!(is_causal && attn_mask.has_value()),
              "attnkernels::attention: attn_mask and is_causal=True cannot be used together");
  const int64_t seed = dropout_seed_of(dropout_seed, dropout_p);
  const c10::cuda::CUDAGuard device_guard(query.device());
  const int64_t E_padded = padded_head_dim(shape.E), Ev_padded = padded_head_dim(shape.Ev);
  at::Tensor out = at::empty({shape.batch, shape.q_heads, shape.L, Ev_padded}, query.options());
  at::Tensor lse = at::empty({shape.batch, shape.q_heads, shape.L}, query.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {narrow_head_dim(out, shape.Ev), lse};
  const at::Tensor q = kernel_layout(query), k = kernel_layout(key), v = kernel_layout(value);
  AttentionParams params = make_params(q, k, v, attn_mask, shape, scale, is_causal, dropout_p, seed);
  params.out = out.mutable_data_ptr();
  params.lse = lse.mutable_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int bucket = forward_head_dim_bucket(E_padded, Ev_padded);
  dispatch_kernel(query.scalar_type(), bucket, [&](auto type_tag, auto bucket_tag) {
    constexpr int D = decltype(bucket_tag)::value;
    check_shared_memory(forward_smem_bytes(D), D, "forward");
    run_attention_forward<decltype(type_tag), D>(params, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {narrow_head_dim(out, shape.Ev), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& query,
    const at::Tensor& key, const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, const at::Tensor& out,
    const at::Tensor& lse, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& dropout_seed, std::array<bool, 4> output_mask) {
  const Shape shape = checked_shape(query, key, value);
  check_dropout(dropout_p);
  check_attention_mask(attn_mask, shape, query, at::kFloat);
  const int64_t seed = dropout_seed_of(dropout_seed, dropout_p);
  TORCH_CHECK(backward_head_dim_bucket(shape.E, shape.Ev) != 0,
              "attnkernels::attention_backward: the CUDA kernel takes head dims up to ", kMaxBackwardHeadDim,
              ", got E = ", shape.E, " and Ev = ", shape.Ev, "; use backend='triton' or backend='reference'");
  TORCH_CHECK(grad_out.sizes() == out.sizes() &&
                  out.sizes() == at::IntArrayRef({shape.batch, shape.q_heads, shape.L, shape.Ev}),
              "attnkernels::attention_backward: expected grad_out and out of shape (B, Hq, L, Ev), got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == query.scalar_type() && out.scalar_type() == query.scalar_type(),
              "attnkernels::attention_backward: expected grad_out and out of dtype ", query.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({shape.batch, shape.q_heads, shape.L}) && lse.scalar_type() == at::kFloat,
              "attnkernels::attention_backward: expected lse of shape (B, Hq, L) and dtype float32, got ",
              lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(!grad_lse.has_value() || (grad_lse->sizes() == lse.sizes() && grad_lse->scalar_type() == at::kFloat),
              "attnkernels::attention_backward: expected grad_lse like lse");
  const bool want_mask_grad = output_mask[3] && attn_mask.has_value();
  TORCH_CHECK(!want_mask_grad || attn_mask->scalar_type() != at::kBool,
              "attnkernels::attention_backward: a bool attn_mask has no gradient");
  const c10::cuda::CUDAGuard device_guard(query.device());

  const int64_t E_padded = padded_head_dim(shape.E), Ev_padded = padded_head_dim(shape.Ev);
  const at::ScalarType acc_type = at::kFloat;
  at::Tensor dq_accum = at::zeros({shape.batch, shape.q_heads, shape.L, E_padded}, query.options().dtype(acc_type));
  at::Tensor grad_k = at::zeros({shape.batch, shape.kv_heads, shape.S, E_padded}, key.options());
  at::Tensor grad_v = at::zeros({shape.batch, shape.kv_heads, shape.S, Ev_padded}, value.options());
  at::Tensor grad_mask;
  if (want_mask_grad) {
    grad_mask = at::zeros({shape.batch, shape.q_heads, shape.L, shape.S}, query.options().dtype(acc_type));
  }
  if (shape.batch * shape.q_heads * shape.L > 0 && shape.S > 0) {
    const at::Tensor q = kernel_layout(query), k = kernel_layout(key), v = kernel_layout(value);
    // dO and O contiguous with the padded width: the kernel reads dO rows of Ev_padded.
    const at::Tensor go = kernel_layout(grad_out).contiguous(), o = kernel_layout(out).contiguous();
    const at::Tensor l = lse.contiguous();
    std::optional<at::Tensor> gl;
    if (grad_lse.has_value()) gl = grad_lse->contiguous();
    at::Tensor delta = at::empty({shape.batch, shape.q_heads, shape.L}, query.options().dtype(acc_type));
    AttentionParams params = make_params(q, k, v, attn_mask, shape, scale, is_causal, dropout_p, seed);
    params.grad_out = go.const_data_ptr();
    params.lse_in = l.const_data_ptr<float>();
    params.delta = delta.const_data_ptr<float>();
    params.dq_accum = dq_accum.mutable_data_ptr<float>();
    params.dk = grad_k.mutable_data_ptr();
    params.dv = grad_v.mutable_data_ptr();
    params.grad_mask = want_mask_grad ? grad_mask.mutable_data_ptr<float>() : nullptr;
    // Deterministic mode accumulates dQ in one fixed order (one block per kv head walks the key blocks).
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int bucket = backward_head_dim_bucket(E_padded, Ev_padded);
    dispatch_kernel(query.scalar_type(), bucket, [&](auto type_tag, auto bucket_tag) {
      using T = decltype(type_tag);
      constexpr int D = decltype(bucket_tag)::value;
      if constexpr (D <= kMaxBackwardHeadDim) {
        check_shared_memory(backward_smem_bytes(D), D, "backward");
        run_attention_backward_preprocess<T>(static_cast<const T*>(go.const_data_ptr()),
                                             static_cast<const T*>(o.const_data_ptr()),
                                             gl.has_value() ? gl->const_data_ptr<float>() : nullptr,
                                             delta.mutable_data_ptr<float>(), shape.batch * shape.q_heads * shape.L,
                                             static_cast<int>(Ev_padded), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        run_attention_backward<T, D>(params, deterministic, stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  auto wanted_or_empty = [&](bool wanted, const at::Tensor& t, const at::Tensor& like) {
    return wanted ? t : like.new_empty({0});
  };
  const at::Tensor grad_q = output_mask[0] ? narrow_head_dim(dq_accum, shape.E).to(query.scalar_type()) : at::Tensor();
  return {wanted_or_empty(output_mask[0], grad_q, query),
          wanted_or_empty(output_mask[1], narrow_head_dim(grad_k, shape.E), key),
          wanted_or_empty(output_mask[2], narrow_head_dim(grad_v, shape.Ev), value),
          want_mask_grad ? grad_mask : query.new_empty({0}, query.options().dtype(acc_type))};
}

}  // namespace cuda_attention
}  // namespace attnkernels
