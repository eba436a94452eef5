// Shared argument checks of pyengine::importance_reduce_many (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "importance_reduce.h"

namespace pyengine {

struct ImportanceEntry {
  at::Tensor x, g;  // contiguous [N, C] of one dtype; g undefined when absent
  int64_t N = 0, C = 0;
  int64_t out_off = 0;  // start of this entry's [3, C] block in the packed output
};

// Validates every (xs[i], gs[i]) like importance_reduce (messages name the entry), checks that
// all tensors share one device, and returns the entries plus the packed output length.
inline std::vector<ImportanceEntry> importance_many_prepare(
    at::TensorList xs, const c10::List<std::optional<at::Tensor>>& gs, int64_t* total) {
  const char* op = "pyengine::importance_reduce_many";
  TORCH_CHECK_VALUE(gs.size() == 0 || gs.size() == xs.size(), op, ": gs must be empty or have "
                    "one entry per tensor of xs, got ", gs.size(), " for ", xs.size());
  std::vector<ImportanceEntry> out;
  out.reserve(xs.size());
  int64_t off = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const at::Tensor& x = xs[i];
    TORCH_CHECK(x.device() == xs[0].device(), op, ": all tensors must be on one device, got ",
                xs[0].device(), " (entry 0) and ", x.device(), " (entry ", i, ")");
    std::optional<at::Tensor> g;
    if (gs.size() > 0) g = gs.get(i);
    ImportanceEntry e;
    try {
      auto [x2, g2] = importance_reduce_prepare(x, g);
      e.x = x2;
      e.g = g2;
    } catch (const c10::Error& err) {
      // re-raise with the entry index, keeping the Python exception type
      const std::string msg = std::string(op) + ": entry " + std::to_string(i) + ": " +
                              err.what_without_backtrace();
      if (dynamic_cast<const c10::TypeError*>(&err)) TORCH_CHECK_TYPE(false, msg);
      if (dynamic_cast<const c10::ValueError*>(&err)) TORCH_CHECK_VALUE(false, msg);
      TORCH_CHECK(false, msg);
    }
    e.N = e.x.size(0);
    e.C = e.x.size(1);
    e.out_off = off;
    off += 3 * e.C;
    out.push_back(std::move(e));
  }
  *total = off;
  return out;
}

}  // namespace pyengine
