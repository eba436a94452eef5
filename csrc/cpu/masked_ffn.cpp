// CPU kernel of pyengine::masked_ffn_fwd (schema in csrc/ops.cpp).
//
// Gathers the kept rows of w1 / columns of w2 (masked_ffn_prepare), then two BLAS GEMMs
// (at::addmm, multithreaded by ATen) around in-place bias + activation + gate: on a CPU the
// GEMMs dominate and MKL/OpenBLAS beat any hand loop, so there is nothing to fuse.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // the light per-op headers, not ATen/ATen.h
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include "masked_ffn.h"

namespace pyengine {
namespace {

at::Tensor masked_ffn_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                              const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                              const std::optional<at::Tensor>& b2,
                              const std::optional<at::Tensor>& keep,
                              const std::optional<at::Tensor>& gate, c10::string_view act) {
  TORCH_CHECK(x.device().is_cpu(), "pyengine::masked_ffn_fwd (CPU kernel): x must be a CPU "
              "tensor, got ", x.device());
  MaskedFfnArgs a = masked_ffn_prepare(x, w1, b1, w2, b2, keep, gate, std::string(act));
  at::Tensor h = a.b1k.defined() ? at::addmm(a.b1k, a.x2, a.w1k.t()) : at::mm(a.x2, a.w1k.t());
  switch (a.act) {
    case FfnAct::kGelu: at::gelu_(h, "none"); break;
    case FfnAct::kGeluTanh: at::gelu_(h, "tanh"); break;
    case FfnAct::kRelu: at::relu_(h); break;
    case FfnAct::kSilu: at::silu_(h); break;
  }
  if (a.gate2.defined()) h.mul_(a.gate2);
  at::Tensor out = a.b2.defined() ? at::addmm(a.b2, h, a.w2k.t()) : at::mm(h, a.w2k.t());
  return out.view(a.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("masked_ffn_fwd", &masked_ffn_fwd_cpu);
}

}  // namespace pyengine
