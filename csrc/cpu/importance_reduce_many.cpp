// CPU kernel of pyengine::importance_reduce_many (schema in csrc/ops.cpp).
//
// One at::parallel_for over the tiles of every tensor: tensor i is cut into R_i row blocks x
// ceil(C_i / kChannelBlock) channel blocks (R_i > 1 only for tensors big enough to be worth it),
// each tile writes its own [3, c-block] partial in double, and the partials of a tensor are
// summed into its float32 [3, C_i] block of the packed output at the end. Small tensors (a
// layer's per-head statistics) share threads with big ones instead of each paying a parallel
// region of its own.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // the light per-op headers, not ATen/ATen.h
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/importance_tile.h"
#include "importance_reduce_many.h"

namespace pyengine {
namespace {

using cpu_tile::kChannelBlock;
using cpu_tile::kMinRowsPerBlock;
using cpu_tile::reduce_tile;

constexpr int64_t kTileElements = 1 << 16;  // aim for tiles of about this many elements

struct Job {
  const ImportanceEntry* e;
  int64_t R;       // row blocks
  int64_t n_cb;    // channel blocks
  int64_t tile0;   // first global tile index
  at::Tensor partial;  // double [R, 3, C]
};

template <typename scalar_t>
void run_tile(const Job& job, int64_t t) {
  const ImportanceEntry& e = *job.e;
  const int64_t rb = t / job.n_cb, cb = t % job.n_cb;
  const int64_t r0 = e.N * rb / job.R, r1 = e.N * (rb + 1) / job.R;
  const int64_t c0 = cb * kChannelBlock, c1 = std::min(e.C, c0 + kChannelBlock);
  double* base = job.partial.data_ptr<double>() + rb * 3 * e.C;
  const scalar_t* xp = e.x.const_data_ptr<scalar_t>();
  if (e.g.defined()) {
    reduce_tile<scalar_t, true>(xp, e.g.const_data_ptr<scalar_t>(), e.C, r0, r1, c0, c1, base,
                                base + e.C, base + 2 * e.C);
  } else {
    reduce_tile<scalar_t, false>(xp, nullptr, e.C, r0, r1, c0, c1, base, base + e.C,
                                 base + 2 * e.C);
  }
}

at::Tensor importance_reduce_many_cpu(at::TensorList xs,
                                      const c10::List<std::optional<at::Tensor>>& gs) {
  int64_t total = 0;
  const std::vector<ImportanceEntry> entries = importance_many_prepare(xs, gs, &total);
  for (const auto& e : entries) {
    TORCH_CHECK(e.x.device().is_cpu(), "pyengine::importance_reduce_many (CPU kernel): tensors "
                "must be on the CPU, got ", e.x.device());
  }
  at::Tensor out = at::zeros({total}, at::TensorOptions().dtype(at::kFloat));
  std::vector<Job> jobs;
  int64_t tiles = 0;
  for (const auto& e : entries) {
    if (e.N == 0 || e.C == 0) continue;  // zeros already
    const int64_t n_cb = (e.C + kChannelBlock - 1) / kChannelBlock;
    const int64_t per_cb = e.N * std::min(e.C, kChannelBlock);
    const int64_t R = std::max<int64_t>(
        1, std::min(per_cb / kTileElements, e.N / kMinRowsPerBlock));
    // absg rows are never written without g: zero-init the partials then
    at::Tensor partial = e.g.defined()
        ? at::empty({R, 3, e.C}, at::TensorOptions().dtype(at::kDouble))
        : at::zeros({R, 3, e.C}, at::TensorOptions().dtype(at::kDouble));
    jobs.push_back(Job{&e, R, n_cb, tiles, partial});
    tiles += R * n_cb;
  }
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // the job owning tile t: last job whose tile0 <= t
      auto it = std::upper_bound(jobs.begin(), jobs.end(), t,
                                 [](int64_t v, const Job& j) { return v < j.tile0; });
      const Job& job = *(it - 1);
      const int64_t local = t - job.tile0;
      switch (job.e->x.scalar_type()) {
        case at::kFloat: run_tile<float>(job, local); break;
        case at::kDouble: run_tile<double>(job, local); break;
        case at::kHalf: run_tile<at::Half>(job, local); break;
        case at::kBFloat16: run_tile<at::BFloat16>(job, local); break;
        default: TORCH_CHECK(false, "pyengine::importance_reduce_many: unexpected dtype");
      }
    }
  };
  if (tiles > 0) at::parallel_for(0, tiles, 1, body);
  for (const auto& job : jobs) {
    at::Tensor sum = job.R == 1 ? job.partial[0] : job.partial.sum(0);
    out.narrow(0, job.e->out_off, 3 * job.e->C).copy_(sum.reshape({-1}));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("importance_reduce_many", &importance_reduce_many_cpu);
}

}  // namespace pyengine
