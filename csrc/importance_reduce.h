// Shared argument checks and shape handling of pyengine::importance_reduce.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace pyengine {

// Validates (x, g), returns x and g as contiguous [N, C] tensors of one common floating dtype
// (g undefined when absent). Errors: TypeError for non-floating dtypes, ValueError for shapes,
// RuntimeError for devices.
inline bool importance_reduce_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline std::pair<at::Tensor, at::Tensor> importance_reduce_prepare(
    const at::Tensor& x, const std::optional<at::Tensor>& g_opt) {
  TORCH_CHECK_VALUE(x.dim() >= 1,
                    "pyengine::importance_reduce: x must have at least 1 dim ([..., C]), got a "
                    "0-dim tensor");
  TORCH_CHECK_TYPE(importance_reduce_dtype_ok(x.scalar_type()),
                   "pyengine::importance_reduce: x must be a floating tensor (float32, float16, "
                   "bfloat16 or float64), got ", x.scalar_type());
  const int64_t C = x.size(-1);
  const int64_t N = C == 0 ? 0 : x.numel() / C;
  at::Tensor x2 = x;
  at::Tensor g2;
  if (g_opt.has_value() && g_opt->defined()) {
    const at::Tensor& g = *g_opt;
    TORCH_CHECK_TYPE(importance_reduce_dtype_ok(g.scalar_type()),
                     "pyengine::importance_reduce: g must be a floating tensor (float32, "
                     "float16, bfloat16 or float64), got ",
                     g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == x.sizes(),
                      "pyengine::importance_reduce: g must have the shape of x, got g ",
                      g.sizes(), " and x ", x.sizes());
    TORCH_CHECK(g.device() == x.device(),
                "pyengine::importance_reduce: x and g must be on the same device, got x on ",
                x.device(), " and g on ", g.device());
    if (g.scalar_type() != x.scalar_type()) {
      const auto common = c10::promoteTypes(x.scalar_type(), g.scalar_type());
      x2 = x2.to(common);
      g2 = g.to(common);
    } else {
      g2 = g;
    }
    g2 = g2.reshape({N, C}).contiguous();
  }
  x2 = x2.reshape({N, C}).contiguous();
  return {x2, g2};
}

}  // namespace pyengine
