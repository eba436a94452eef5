// CPU kernel of pyengine::importance_reduce (schema in csrc/ops.cpp).
//
// x (and g) are viewed as contiguous [N, C]. The work is cut into tiles of (row block, channel
// block); tiles run in parallel with at::parallel_for. Wide layers (C large) are parallelized
// over channels only (one row block); narrow ones also over rows, with one partial [3, C] per
// row block summed at the end. Accumulation is in double whatever the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "importance_reduce.h"

namespace pyengine {
namespace {

constexpr int64_t kChannelBlock = 256;       // 3 * 256 doubles of accumulators per tile
constexpr int64_t kMinRowsPerBlock = 256;    // don't split rows finer than this
constexpr int64_t kSerialElements = 1 << 15; // below this, one thread does it all

template <typename scalar_t, bool HAS_G>
void reduce_tile(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t C,
                 int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* __restrict__ out_abs,
                 double* __restrict__ out_sq, double* __restrict__ out_absg) {
  const int64_t w = c1 - c0;
  double acc_abs[kChannelBlock];
  double acc_sq[kChannelBlock];
  double acc_absg[kChannelBlock];
  for (int64_t j = 0; j < w; ++j) {
    acc_abs[j] = 0.0;
    acc_sq[j] = 0.0;
    acc_absg[j] = 0.0;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C + c0;
    if constexpr (HAS_G) {
      const scalar_t* gr = g + r * C + c0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const double v = static_cast<double>(xr[j]);
        const double gv = static_cast<double>(gr[j]);
        acc_abs[j] += std::abs(v);
        acc_sq[j] += v * v;
        acc_absg[j] += std::abs(v * gv);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const double v = static_cast<double>(xr[j]);
        acc_abs[j] += std::abs(v);
        acc_sq[j] += v * v;
      }
    }
  }
  for (int64_t j = 0; j < w; ++j) {
    out_abs[c0 + j] = acc_abs[j];
    out_sq[c0 + j] = acc_sq[j];
    if constexpr (HAS_G) out_absg[c0 + j] = acc_absg[j];
  }
}

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
