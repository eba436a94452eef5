// CPU kernel of pyengine::importance_reduce (schema in csrc/ops.cpp).
//
// x (and g) are viewed as contiguous [N, C]. The work is cut into tiles of (row block, channel
// block); tiles run in parallel with at::parallel_for. Wide layers (C large) are parallelized
// over channels only (one row block); narrow ones also over rows, with one partial [3, C] per
// row block summed at the end. Accumulation is in double whatever the input dtype.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // the light per-op headers, not ATen/ATen.h
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "importance_reduce.h"
#include "cpu/importance_tile.h"

namespace pyengine {
namespace {

using cpu_tile::kChannelBlock;
using cpu_tile::kMinRowsPerBlock;
using cpu_tile::kSerialElements;
using cpu_tile::reduce_tile;

template <typename scalar_t, bool HAS_G>
void run(const at::Tensor& x, const at::Tensor& g, int64_t N, int64_t C, at::Tensor& partial,
         int64_t R) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = HAS_G ? g.const_data_ptr<scalar_t>() : nullptr;
  double* pp = partial.data_ptr<double>();
  const int64_t n_cb = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t tiles = R * n_cb;
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / n_cb;
      const int64_t cb = t % n_cb;
      const int64_t r0 = N * rb / R;
      const int64_t r1 = N * (rb + 1) / R;
      const int64_t c0 = cb * kChannelBlock;
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      double* base = pp + rb * 3 * C;
      reduce_tile<scalar_t, HAS_G>(xp, gp, C, r0, r1, c0, c1, base, base + C, base + 2 * C);
    }
  };
  if (N * C < kSerialElements || tiles == 1) {
    body(0, tiles);
  } else {
    at::parallel_for(0, tiles, 1, body);
  }
}

at::Tensor importance_reduce_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& g_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "pyengine::importance_reduce (CPU kernel): x must be on "
              "the CPU, got ", x_in.device());
  auto [x, g] = importance_reduce_prepare(x_in, g_in);
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const bool has_g = g.defined();
  if (N == 0 || C == 0) {
    return at::zeros({3, C}, x_in.options().dtype(at::kFloat));
  }

  // Row blocks: enough tiles to keep every thread busy, never blocks of fewer than
  // kMinRowsPerBlock rows.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n_cb = (C + kChannelBlock - 1) / kChannelBlock;
  int64_t R = 1;
  if (N * C >= kSerialElements && n_cb < 2 * threads) {
    R = std::min<int64_t>((2 * threads + n_cb - 1) / n_cb,
                          std::max<int64_t>(1, N / kMinRowsPerBlock));
  }
  // rows of partial that no tile writes (absg when g is None) must read as zero
  at::Tensor partial = has_g ? at::empty({R, 3, C}, x.options().dtype(at::kDouble))
                             : at::zeros({R, 3, C}, x.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "pyengine::importance_reduce_cpu", [&] {
    if (has_g) {
      run<scalar_t, true>(x, g, N, C, partial, R);
    } else {
      run<scalar_t, false>(x, g, N, C, partial, R);
    }
  });
  at::Tensor total = R == 1 ? partial[0] : partial.sum(0);
  return total.to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("importance_reduce", &importance_reduce_cpu);
}

}  // namespace pyengine
