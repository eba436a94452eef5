// Shared argument checks and head table of pyengine::varlen_attention_fwd (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace pyengine {

// Per-head layout of the packed q/k/v/out widths.
struct VarlenHeads {
  std::vector<int64_t> qk_dim, v_dim, qk_off, v_off;
  std::vector<double> scale;
  int64_t max_qk = 0, max_v = 0, qk_sum = 0, v_sum = 0;
  int64_t size() const { return static_cast<int64_t>(qk_dim.size()); }
};

inline bool varlen_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Validates the arguments (ValueError for shapes/dims, TypeError for dtypes, RuntimeError for
// devices) and returns the head table. `kernel` names the caller in messages.
inline VarlenHeads varlen_attention_check(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, at::IntArrayRef qk_dims,
                                          at::IntArrayRef v_dims, at::ArrayRef<double> scales,
                                          const char* kernel) {
  const char* op = "pyengine::varlen_attention_fwd";
  TORCH_CHECK_VALUE(qk_dims.size() == v_dims.size() && qk_dims.size() == scales.size(), op,
                    ": qk_dims, v_dims and scales must have one entry per head, got ",
                    qk_dims.size(), ", ", v_dims.size(), " and ", scales.size());
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
                    ": q, k, v must be [batch, tokens, packed dims], got shapes ", q.sizes(),
                    ", ", k.sizes(), ", ", v.sizes());
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_TYPE(varlen_dtype_ok(t->scalar_type()), op, ": q, k, v must be float32, float16, "
                     "bfloat16 or float64, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
                   ": q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                   ", ", v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": q, k, v must be on one device, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  VarlenHeads h;
  const size_t H = qk_dims.size();
  h.qk_dim.resize(H);
  h.v_dim.resize(H);
  h.qk_off.resize(H);
  h.v_off.resize(H);
  h.scale.assign(scales.begin(), scales.end());
  for (size_t i = 0; i < H; ++i) {
    TORCH_CHECK_VALUE(qk_dims[i] >= 0 && v_dims[i] >= 0, op, ": head ", i,
                      " has a negative dim (qk_dim ", qk_dims[i], ", v_dim ", v_dims[i], ")");
    h.qk_dim[i] = qk_dims[i];
    h.v_dim[i] = v_dims[i];
    h.qk_off[i] = h.qk_sum;
    h.v_off[i] = h.v_sum;
    h.qk_sum += qk_dims[i];
    h.v_sum += v_dims[i];
    h.max_qk = std::max(h.max_qk, qk_dims[i]);
    h.max_v = std::max(h.max_v, v_dims[i]);
  }
  TORCH_CHECK_VALUE(q.size(2) == h.qk_sum && k.size(2) == h.qk_sum, op,
                    ": the last dims of q and k (", q.size(2), ", ", k.size(2),
                    ") must equal sum(qk_dims) = ", h.qk_sum);
  TORCH_CHECK_VALUE(v.size(2) == h.v_sum, op, ": the last dim of v (", v.size(2),
                    ") must equal sum(v_dims) = ", h.v_sum);
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0), op,
                    ": q, k, v must have one batch size, got shapes ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) == v.size(1), op, ": k and v must have one token count, got ",
                    k.size(1), " and ", v.size(1));
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* ts[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK_VALUE(ts[i]->size(2) <= 1 || ts[i]->stride(2) == 1, op, " (", kernel, "): ",
                      names[i], " must be contiguous in its last dim (stride 1), got strides ",
                      ts[i]->strides(), "; call .contiguous() first");
  }
  return h;
}

}  // namespace pyengine
