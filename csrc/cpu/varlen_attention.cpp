// CPU kernel of pyengine::varlen_attention_fwd (schema in csrc/ops.cpp).
//
// This file checks the arguments, allocates the packed output and runs one parallel region for
// all heads of the call: the work items (batch x head x block of kBlockM query rows) are split
// into one contiguous range per thread of about equal cost (heads differ in width, and compact
// models pack them sorted by width, so equal item counts would not balance), and each thread
// runs its range with the vector-ISA build the CPU supports (varlen_attention_kernel.h, built
// for AVX512, AVX2 and the baseline ISA). The ISA follows torch's own choice
// (at::get_cpu_capability(), which honors ATEN_CPU_CAPABILITY); PYENGINE_CPU_CAPABILITY=
// default|avx2|avx512 lowers it further (tests run every build that the machine can).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // the light per-op headers, not ATen/ATen.h
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/varlen_attention_cpu.h"
#include "varlen_attention.h"

namespace pyengine {
namespace varlen_cpu {

int64_t workspace_bytes(const Problem& p) {
  const int64_t elem = p.dtype == Dtype::kDouble ? 8 : 4;
  int64_t n = (std::max<int64_t>(p.max_qk, 1) + score_rows(p) + std::max<int64_t>(p.max_v, 1) + 2) *
              p.block_m;
  if (p.dtype == Dtype::kBFloat16 || p.dtype == Dtype::kHalf) n += p.Nq * p.max_qk + p.Nk * (p.max_qk + p.max_v);
  return (n * elem + 63) / 64 * 64;
}

namespace {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Isa cpu_isa() {
  Isa isa = Isa::kDefault;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const std::string torch_cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
  if (torch_cap.rfind("AVX512", 0) == 0) {
    isa = Isa::kAvx512;
  } else if (torch_cap == "AVX2") {
    isa = Isa::kAvx2;
  }
  // the target lists of cpu/vec_isa_begin.h
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (isa == Isa::kAvx512 && !avx512) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && !avx2) isa = Isa::kDefault;
  if (const char* cap = std::getenv("PYENGINE_CPU_CAPABILITY")) {
    Isa asked = isa;
    if (std::strcmp(cap, "default") == 0) {
      asked = Isa::kDefault;
    } else if (std::strcmp(cap, "avx2") == 0) {
      asked = Isa::kAvx2;
    } else if (std::strcmp(cap, "avx512") != 0 && cap[0] != '\0') {
      TORCH_CHECK_VALUE(false, "pyengine::varlen_attention_fwd (CPU kernel): "
                        "PYENGINE_CPU_CAPABILITY must be default, avx2 or avx512, got '", cap,
                        "'");
    }
    isa = std::min(isa, asked);
  }
#endif
  return isa;
}

using RunItems = void (*)(const Problem&, int64_t, int64_t, void*);

RunItems kernel_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &AVX512::run_items;
    case Isa::kAvx2: return &AVX2::run_items;
    default: return &DEFAULT::run_items;
  }
}

// Relative cost of an item: the two GEMMs and the exponentials of its (padded) query rows.
int64_t item_cost(const Problem& p, int64_t h, int64_t rows) {
  const int64_t dq = p.qk_dim[h], dv = p.v_dim[h];
  if (dv == 0) return 0;
  if (dq == 0) return p.Nk * dv + rows * dv;
  const int64_t padded = (rows + 15) / 16 * 16;
  return padded * (p.Nk * (dq + dv + 8) + dq + dv);
}

}  // namespace
}  // namespace varlen_cpu

namespace {

at::Tensor varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, at::IntArrayRef qk_dims,
                                    at::IntArrayRef v_dims, at::ArrayRef<double> scales) {
  using namespace varlen_cpu;
  const VarlenHeads h = varlen_attention_check(q, k, v, qk_dims, v_dims, scales, "CPU kernel");
  TORCH_CHECK(q.device().is_cpu(), "pyengine::varlen_attention_fwd (CPU kernel): q, k, v must "
              "be CPU tensors, got ", q.device());
  const int64_t B = q.size(0), Nq = q.size(1), Nk = k.size(1);
  at::Tensor out = at::empty({B, Nq, h.v_sum}, v.options());
  if (out.numel() == 0) return out;

  Problem p{};
  switch (v.scalar_type()) {
    case at::kFloat: p.dtype = Dtype::kFloat; break;
    case at::kDouble: p.dtype = Dtype::kDouble; break;
    case at::kBFloat16: p.dtype = Dtype::kBFloat16; break;
    default: p.dtype = Dtype::kHalf; break;  // the check admits these four
  }
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.B = B;
  p.Nq = Nq;
  p.Nk = Nk;
  p.H = h.size();
  p.sqb = q.stride(0);
  p.sqn = q.stride(1);
  p.skb = k.stride(0);
  p.skn = k.stride(1);
  p.svb = v.stride(0);
  p.svn = v.stride(1);
  p.sob = out.stride(0);
  p.son = out.stride(1);
  p.qk_dim = h.qk_dim.data();
  p.v_dim = h.v_dim.data();
  p.qk_off = h.qk_off.data();
  p.v_off = h.v_off.data();
  p.scale = h.scale.data();
  p.max_qk = h.max_qk;
  p.max_v = h.max_v;
  p.block_m = kBlockM;
  p.block_n = kBlockN;
  if (const char* tune = std::getenv("PYENGINE_VARLEN_TUNE")) {  // DEV ONLY
    long bm = 0, bn = 0;
    if (std::sscanf(tune, "%ld,%ld", &bm, &bn) == 2 && bm > 0 && bm % 16 == 0 && bn > 0) {
      p.block_m = bm;
      p.block_n = bn;
    }
  }
  p.n_qblocks = (Nq + p.block_m - 1) / p.block_m;
  p.n_kblocks = std::max<int64_t>(1, (Nk + p.block_n - 1) / p.block_n);

  // one contiguous item range per thread, of about equal cost
  const int64_t n_items = B * p.H * p.n_qblocks;
  std::vector<int64_t> prefix(n_items + 1, 0);
  for (int64_t it = 0; it < n_items; ++it) {
    const int64_t qb = it % p.n_qblocks, hh = (it / p.n_qblocks) % p.H;
    int64_t i0 = 0, rows = 0;
    query_block(p, qb, &i0, &rows);
    prefix[it + 1] = prefix[it] + item_cost(p, hh, rows);
  }
  const int64_t total = prefix[n_items];
  const int64_t threads = at::in_parallel_region()
                              ? 1
                              : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                       n_items));
  std::vector<int64_t> bound(threads + 1, n_items);
  bound[0] = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t target = total * t / threads;
    bound[t] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  const RunItems run = kernel_for(cpu_isa());
  const int64_t ws_bytes = workspace_bytes(p);
  at::Tensor ws = at::empty({threads * ws_bytes}, q.options().dtype(at::kByte));
  uint8_t* ws_base = ws.mutable_data_ptr<uint8_t>();  // 64-byte aligned (torch's allocator)
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (bound[t] < bound[t + 1]) run(p, bound[t], bound[t + 1], ws_base + t * ws_bytes);
    }
  };
  if (threads == 1) {
    body(0, 1);
  } else {
    at::parallel_for(0, threads, 1, body);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyengine, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
}

}  // namespace pyengine
