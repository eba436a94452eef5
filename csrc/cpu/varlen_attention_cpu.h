// The CPU kernel of pyengine::varlen_attention_fwd, split by instruction set.
//
// csrc/cpu/varlen_attention.cpp (compiled for the baseline ISA) checks the arguments, splits
// the work and runs the parallel region; the math lives in varlen_attention_kernel.h, compiled
// once per vector ISA (varlen_attention_{default,avx2,avx512}.cpp), and the variant the CPU
// supports (and torch's ATEN_CPU_CAPABILITY allows) is picked per call. This header is what
// both sides share: plain data and function declarations, no vector types.
#pragma once

#include <cstdint>

namespace pyengine {
namespace varlen_cpu {

enum class Dtype : int { kFloat, kDouble, kBFloat16, kHalf };

// Query rows per work item (a multiple of every vector width, so only an item holding the last
// rows of a sequence is padded) and keys per block of the online softmax.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 128;

// One call's inputs: packed q/k/v/out (element strides; the last dim has stride 1) and the
// per-head table of csrc/varlen_attention.h.
struct Problem {
  Dtype dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t B, Nq, Nk, H;
  int64_t sqb, sqn, skb, skn, svb, svn, sob, son;
  const int64_t* qk_dim;
  const int64_t* v_dim;
  const int64_t* qk_off;
  const int64_t* v_off;
  const double* scale;
  int64_t max_qk, max_v;
  int64_t block_m, block_n;  // kBlockM, kBlockN (tuning runs try others)
  int64_t n_qblocks;  // ceil(Nq / block_m); item = (b * H + h) * n_qblocks + query block
  int64_t n_kblocks;  // ceil(Nk / block_n)
};

// Query rows [*i0, *i0 + *rows) of query block qb: the blocks share the rows in units of 16
// (a multiple of every vector length), so only the last block is padded, and a short remainder
// is spread over all blocks instead of making a block of a few rows (197 rows: 48, 48, 48, 53).
inline void query_block(const Problem& p, int64_t qb, int64_t* i0, int64_t* rows) {
  const int64_t units = (p.Nq + 15) / 16;
  const int64_t u0 = qb * units / p.n_qblocks, u1 = (qb + 1) * units / p.n_qblocks;
  *i0 = u0 * 16;
  *rows = (u1 * 16 < p.Nq ? u1 * 16 : p.Nq) - *i0;
}

// Keys [*j0, *j0 + *keys) of key block kb: equal blocks of at most block_n keys.
inline void key_block(const Problem& p, int64_t kb, int64_t* j0, int64_t* keys) {
  const int64_t k0 = kb * p.Nk / p.n_kblocks, k1 = (kb + 1) * p.Nk / p.n_kblocks;
  *j0 = k0;
  *keys = k1 - k0;
}

// Rows of the score tile S^T [score_rows][block_m] (it also holds a 16-bit output block
// [block_m][v_dim] on its way out).
inline int64_t score_rows(const Problem& p) {
  return p.max_v > p.block_n ? p.max_v : p.block_n;
}

// Bytes of scratch one thread needs (its items' tiles and, for 16-bit inputs, its head's K and V
// converted to float). 64-byte aligned by the caller.
int64_t workspace_bytes(const Problem& p);

// Runs items [item0, item1) of `p` with `ws` (workspace_bytes(p) bytes) as scratch; one
// declaration per vector ISA (namespaces named like ATen's CPU_CAPABILITY values).
#define PYENGINE_VARLEN_CPU_DECLARE(CAP)                                                     \
  namespace CAP {                                                                              \
  void run_items(const Problem& p, int64_t item0, int64_t item1, void* ws);                    \
  }
PYENGINE_VARLEN_CPU_DECLARE(DEFAULT)
PYENGINE_VARLEN_CPU_DECLARE(AVX2)
PYENGINE_VARLEN_CPU_DECLARE(AVX512)
#undef PYENGINE_VARLEN_CPU_DECLARE

}  // namespace varlen_cpu
}  // namespace pyengine
