// Shared argument checks and gathering of pyengine::masked_ffn_fwd (CPU and CUDA).
//
// Both backends compute the same three steps on the gathered (kept) weights:
//   h = x2 @ w1k^T (+ b1k);  h = act(h) * gate2;  out = h @ w2k^T (+ b2)
// and differ only in how the middle step runs (ATen in-place ops on CPU, one fused kernel for
// bias + activation + gate on CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace pyengine {

enum class FfnAct : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

struct MaskedFfnArgs {
  at::Tensor x2;     // [M, in]
  at::Tensor w1k;    // [K, in] (kept rows of w1)
  at::Tensor b1k;    // [K] or undefined
  at::Tensor w2k;    // [out, K] (kept columns of w2)
  at::Tensor b2;     // [out] or undefined
  at::Tensor gate2;  // [K] or [M, K] contiguous, or undefined
  FfnAct act = FfnAct::kGelu;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [out]
};

inline FfnAct masked_ffn_act(const std::string& act) {
  if (act == "gelu") return FfnAct::kGelu;
  if (act == "gelu_tanh") return FfnAct::kGeluTanh;
  if (act == "relu") return FfnAct::kRelu;
  if (act == "silu") return FfnAct::kSilu;
  TORCH_CHECK_VALUE(false, "pyengine::masked_ffn_fwd: unknown activation '", act,
                    "'; choose from gelu, gelu_tanh, relu, silu");
  return FfnAct::kGelu;
}

inline MaskedFfnArgs masked_ffn_prepare(const at::Tensor& x, const at::Tensor& w1,
                                        const std::optional<at::Tensor>& b1,
                                        const at::Tensor& w2,
                                        const std::optional<at::Tensor>& b2,
                                        const std::optional<at::Tensor>& keep,
                                        const std::optional<at::Tensor>& gate,
                                        const std::string& act) {
  const char* op = "pyengine::masked_ffn_fwd";
  MaskedFfnArgs a;
  a.act = masked_ffn_act(act);
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf ||
                   dt == at::kBFloat16, op, ": x must be float32, float64, float16 or bfloat16, "
                   "got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must be [..., in], got a 0-dim tensor");
  TORCH_CHECK_VALUE(w1.dim() == 2 && w2.dim() == 2, op, ": w1 [hidden, in] and w2 [out, hidden] "
                    "must be 2-dim, got shapes ", w1.sizes(), " and ", w2.sizes());
  const int64_t H = w1.size(0), in = w1.size(1), out = w2.size(0);
  TORCH_CHECK_VALUE(x.size(-1) == in && w2.size(1) == H, op, ": shapes do not chain: x ",
                    x.sizes(), ", w1 ", w1.sizes(), ", w2 ", w2.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == dt, op, ": ", name, " must have x's dtype ", dt,
                     ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(),
                ", got ", t.device());
  };
  same(w1, "w1");
  same(w2, "w2");
  if (b1.has_value() && b1->defined()) {
    same(*b1, "b1");
    TORCH_CHECK_VALUE(b1->dim() == 1 && b1->size(0) == H, op, ": b1 must be [", H, "], got ",
                      b1->sizes());
    a.b1k = *b1;
  }
  if (b2.has_value() && b2->defined()) {
    same(*b2, "b2");
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == out, op, ": b2 must be [", out,
                      "], got ", b2->sizes());
    a.b2 = b2->contiguous();
  }
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  a.out_shape = lead;
  a.out_shape.push_back(out);
  a.x2 = x.reshape({-1, in});
  const int64_t M = a.x2.size(0);

  at::Tensor g;
  if (gate.has_value() && gate->defined()) {
    g = *gate;
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), op, ": gate must be a floating "
                     "tensor, got ", g.scalar_type());
    TORCH_CHECK(g.device() == x.device(), op, ": gate must be on x's device ", x.device(),
                ", got ", g.device());
    TORCH_CHECK_VALUE(g.dim() >= 1 && g.size(-1) == H, op, ": gate must be [..., ", H,
                      "] (one multiplier per hidden neuron), got ", g.sizes());
    std::vector<int64_t> full = lead;
    full.push_back(H);
    bool broadcasts = g.dim() <= static_cast<int64_t>(full.size());
    for (int64_t i = 1; broadcasts && i <= g.dim(); ++i) {
      const int64_t gs = g.size(-i), fs = full[full.size() - i];
      broadcasts = gs == fs || gs == 1;
    }
    TORCH_CHECK_VALUE(broadcasts, op, ": gate of shape ", g.sizes(),
                      " does not broadcast to the hidden activations ", at::IntArrayRef(full));
    g = g.to(dt);
  }

  if (keep.has_value() && keep->defined()) {
    at::Tensor kp = *keep;
    TORCH_CHECK_TYPE(kp.scalar_type() == at::kLong || kp.scalar_type() == at::kInt, op,
                     ": keep must hold int64 or int32 neuron indices, got ", kp.scalar_type());
    TORCH_CHECK_VALUE(kp.dim() == 1, op, ": keep must be 1-dim, got shape ", kp.sizes());
    TORCH_CHECK(kp.device().is_cpu() || kp.device() == x.device(), op,
                ": keep must be on the CPU or on x's device ", x.device(), ", got ", kp.device());
    if (kp.numel() > 0) {
      // range check before any gather (an out-of-range index would be a device-side assert on
      // CUDA); for keep on a GPU this costs one synchronisation
      const auto mm = at::aminmax(kp);
      const int64_t lo = std::get<0>(mm).item<int64_t>();
      const int64_t hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < H, op, ": keep holds index ", lo < 0 ? lo : hi,
                        " out of range [0, ", H, ")");
    }
    kp = kp.to(x.device(), at::kLong);
    a.w1k = w1.index_select(0, kp);
    a.w2k = w2.index_select(1, kp);
    if (a.b1k.defined()) a.b1k = a.b1k.index_select(0, kp);
    if (g.defined()) g = g.index_select(-1, kp);
  } else {
    a.w1k = w1;
    a.w2k = w2;
  }
  if (a.b1k.defined()) a.b1k = a.b1k.contiguous();
  if (g.defined()) {
    const int64_t K = a.w1k.size(0);
    if (g.dim() == 1) {
      a.gate2 = g.contiguous();
    } else {
      std::vector<int64_t> full = lead;
      full.push_back(K);
      a.gate2 = g.expand(full).reshape({M, K}).contiguous();
    }
  }
  return a;
}

}  // namespace pyengine
