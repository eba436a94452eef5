// The math of the CPU varlen-attention kernel, compiled once per vector ISA: include it only
// from csrc/cpu/varlen_attention_{default,avx2,avx512}.cpp, after cpu/vec_isa_begin.h has set
// CPU_CAPABILITY (ATen's name of the ISA, which also namespaces at::vec) and the target.
//
// Work item: one query block (up to kBlockM rows) of one head of one batch element.
// Everything runs "transposed", vectorized along the block's queries: the scores are kept as
// S^T [keys][queries], so
//   * S^T = K Q^T is a register-tiled GEMM that broadcasts K[j][d] and loads Q^T[d][i:i+L]:
//     the head widths (1..64, any value) are only loop counts, never padded to a vector width;
//   * the online softmax (flash-style: key blocks of kBlockN, a running max m and sum l per
//     query) is element-wise across a query vector, with no horizontal reductions;
//   * O^T += V^T P^T is the same GEMM, broadcasting V[j][c] and loading P^T[j][i:i+L].
// Only the last block of a sequence is padded (to a multiple of the vector length). q is scaled
// while transposed into Q^T; fp32/fp64 K and V are read in place through their strides (q, k, v
// may be views of one qkv projection), 16-bit K and V are converted to fp32 once per head and
// thread. The output block is written transposed back into the packed [B, N, sum(v_dims)].
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "cpu/varlen_attention_cpu.h"

namespace pyengine {
namespace varlen_cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Register tiles of the GEMMs: NB broadcast rows x NV vectors of accumulators, plus NV loaded
// vectors and one broadcast, within the 32 (AVX512) or 16 (AVX2) vector registers. Fewer
// vectors per row (a short last query block) take more rows.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxNV = 4;
constexpr int rows_for(int nv) { return nv == 4 ? 6 : nv == 3 ? 8 : 12; }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMaxNV = 2;
constexpr int rows_for(int nv) { return nv == 2 ? 6 : 12; }
#else
constexpr int kMaxNV = 1;  // the generic Vectorized: arrays the compiler vectorizes
constexpr int rows_for(int) { return 4; }
#endif

// c[r][v] (+)= sum_k a[r * a_rs + k * a_ks] * b[k * b_rs + v * L] for NB rows and NV vectors.
template <typename A, int NB, int NV>
inline void tile(int64_t depth, const A* __restrict a, int64_t a_rs, int64_t a_ks,
                 const A* __restrict b, int64_t b_rs, A* __restrict c, int64_t c_rs,
                 bool accumulate) {
  using Vec = Vectorized<A>;
  constexpr int L = Vec::size();
  Vec acc[NB][NV];
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? Vec::loadu(c + r * c_rs + v * L) : Vec(A(0));
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + k * b_rs + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < NB; ++r) {
      const Vec av(a[r * a_rs + k * a_ks]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NB; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * c_rs + v * L);
  }
}

// The tile of nb < NB rows (compile-time sizes for the remainder rows).
template <typename A, int NB, int NV>
inline void tile_rows(int nb, int64_t depth, const A* a, int64_t a_rs, int64_t a_ks, const A* b,
                      int64_t b_rs, A* c, int64_t c_rs, bool accumulate) {
  if constexpr (NB > 1) {
    if (nb < NB) {
      tile_rows<A, NB - 1, NV>(nb, depth, a, a_rs, a_ks, b, b_rs, c, c_rs, accumulate);
      return;
    }
  }
  tile<A, NB, NV>(depth, a, a_rs, a_ks, b, b_rs, c, c_rs, accumulate);
}

// C[rows][NV vectors] (+)= A[rows][depth] B[depth][NV vectors] in tiles of rows_for(NV) rows.
template <typename A, int NV>
void gemm_cols(int64_t rows, int64_t depth, const A* a, int64_t a_rs, int64_t a_ks, const A* b,
               int64_t b_rs, A* c, int64_t c_rs, bool accumulate) {
  constexpr int NB = rows_for(NV);
  int64_t r0 = 0;
  for (; r0 + NB <= rows; r0 += NB) {
    tile<A, NB, NV>(depth, a + r0 * a_rs, a_rs, a_ks, b, b_rs, c + r0 * c_rs, c_rs, accumulate);
  }
  if (r0 < rows) {
    tile_rows<A, NB - 1, NV>(static_cast<int>(rows - r0), depth, a + r0 * a_rs, a_rs, a_ks, b,
                             b_rs, c + r0 * c_rs, c_rs, accumulate);
  }
}

template <typename A, int NV>
void gemm_nv(int nv, int64_t rows, int64_t depth, const A* a, int64_t a_rs, int64_t a_ks,
             const A* b, int64_t b_rs, A* c, int64_t c_rs, bool accumulate) {
  if constexpr (NV > 1) {
    if (nv < NV) {
      gemm_nv<A, NV - 1>(nv, rows, depth, a, a_rs, a_ks, b, b_rs, c, c_rs, accumulate);
      return;
    }
  }
  gemm_cols<A, NV>(rows, depth, a, a_rs, a_ks, b, b_rs, c, c_rs, accumulate);
}

// C[rows][nvec vectors] (+)= A[rows][depth] B[depth][nvec vectors], A read by broadcasts with
// any strides, B and C rows of whole vectors (row strides b_rs, c_rs).
template <typename A>
void gemm_bcast(int64_t rows, int64_t nvec, int64_t depth, const A* a, int64_t a_rs,
                int64_t a_ks, const A* b, int64_t b_rs, A* c, int64_t c_rs, bool accumulate) {
  constexpr int L = Vectorized<A>::size();
  for (int64_t v0 = 0; v0 < nvec; v0 += kMaxNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kMaxNV, nvec - v0));
    gemm_nv<A, kMaxNV>(nv, rows, depth, a, a_rs, a_ks, b + v0 * L, b_rs, c + v0 * L, c_rs,
                       accumulate);
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols: in-register 16x16 (AVX512,
// masked edges) or 8x8 (AVX2) float transposes, plain loops for the rest.
#if defined(CPU_CAPABILITY_AVX512)
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int nr,
                        int nc) {
  // the unpack/shuffle network of at::vec's transpose_block (vec512_float.h), unrolled
  const __mmask16 load_mask = static_cast<__mmask16>((1u << nc) - 1);
  const __mmask16 store_mask = static_cast<__mmask16>((1u << nr) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    r[i] = i < nr ? _mm512_maskz_loadu_ps(load_mask, src + i * ld_src) : _mm512_setzero_ps();
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
      t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i >= nc) break;
    const __m512 col = i < 8 ? _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88)
                             : _mm512_shuffle_f32x4(t[i - 8], t[i], 0xdd);
    _mm512_mask_storeu_ps(dst + i * ld_dst, store_mask, col);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void transpose8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

template <typename A>
inline void transpose(const A* src, int64_t ld_src, A* dst, int64_t ld_dst, int64_t rows,
                      int64_t cols) {
  int64_t r0 = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    for (; r0 < rows; r0 += 16) {
      const int nr = static_cast<int>(std::min<int64_t>(16, rows - r0));
      for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        transpose16(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst, nr,
                    static_cast<int>(std::min<int64_t>(16, cols - c0)));
      }
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8) {
        transpose8(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst);
      }
      for (int64_t r = r0; r < r0 + 8; ++r) {
        for (int64_t c = c0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

// One key block of the online softmax: S^T [kb][Mp] scores in, probabilities out; the running
// max m and sum l [Mp] are updated and the accumulated O^T [dv][Mp] rescaled to the new max.
template <typename A>
void softmax_block(A* S, int64_t kb, int64_t nvec, int64_t Mp, A* m, A* l, A* Ot, int64_t dv,
                   bool first) {
  using Vec = Vectorized<A>;
  constexpr int L = Vec::size();
  for (int64_t v = 0; v < nvec; ++v) {
    A* s = S + v * L;
    const Vec m_old = Vec::loadu(m + v * L);
    Vec mx = m_old;
    for (int64_t j = 0; j < kb; ++j) mx = at::vec::maximum(mx, Vec::loadu(s + j * Mp));
    mx.store(m + v * L);
    Vec sum(A(0));
    for (int64_t j = 0; j < kb; ++j) {
      const Vec p = (Vec::loadu(s + j * Mp) - mx).exp_u20();
      p.store(s + j * Mp);
      sum = sum + p;
    }
    if (first) {
      sum.store(l + v * L);
    } else {
      const Vec corr = (m_old - mx).exp_u20();
      at::vec::fmadd(Vec::loadu(l + v * L), corr, sum).store(l + v * L);
      for (int64_t c = 0; c < dv; ++c) (Vec::loadu(Ot + c * Mp + v * L) * corr).store(Ot + c * Mp + v * L);
    }
  }
}

// T: the tensors' dtype; A: the compute type (float, or double for double).
template <typename T, typename A>
void run_items_t(const Problem& p, int64_t item0, int64_t item1, void* ws) {
  using Vec = Vectorized<A>;
  constexpr int L = Vec::size();
  static_assert(kBlockM % L == 0, "kBlockM must be a multiple of the vector length");
  const int64_t BM = p.block_m;
  const T* qp = static_cast<const T*>(p.q);
  const T* kp = static_cast<const T*>(p.k);
  const T* vp = static_cast<const T*>(p.v);
  T* op = static_cast<T*>(p.out);
  // workspace: Q^T [max_qk][BM], S^T [score_rows][BM], O^T [max_v][BM], m, l [BM],
  // then (16-bit inputs) the head's Q [Nq][qk_dim], K [Nk][qk_dim], V [Nk][v_dim] in A
  A* Qt = static_cast<A*>(ws);
  A* S = Qt + std::max<int64_t>(p.max_qk, 1) * BM;
  A* Ot = S + score_rows(p) * BM;
  A* m = Ot + std::max<int64_t>(p.max_v, 1) * BM;
  A* l = m + BM;
  A* Qc = l + BM;
  A* Kc = Qc + p.Nq * p.max_qk;
  A* Vc = Kc + p.Nk * p.max_qk;
  int64_t converted = -1;  // the (b * H + h) whose K and V are in Kc, Vc
  for (int64_t it = item0; it < item1; ++it) {
    const int64_t qb = it % p.n_qblocks, bh = it / p.n_qblocks;
    const int64_t h = bh % p.H, b = bh / p.H;
    const int64_t dq = p.qk_dim[h], dv = p.v_dim[h];
    if (dv == 0) continue;
    int64_t i0 = 0, M = 0;
    query_block(p, qb, &i0, &M);
    const int64_t nvec = (M + L - 1) / L, Mp = nvec * L;
    T* ob = op + b * p.sob + i0 * p.son + p.v_off[h];
    if (p.Nk == 0) {  // no keys: zeros, like scaled_dot_product_attention
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t c = 0; c < dv; ++c) ob[i * p.son + c] = T(0);
      }
      continue;
    }
    const A* qq;
    const A* kk;
    const A* vv;
    int64_t ldq, ldk, ldv;
    if constexpr (std::is_same_v<T, A>) {
      qq = qp + b * p.sqb + p.qk_off[h];
      kk = kp + b * p.skb + p.qk_off[h];
      vv = vp + b * p.svb + p.v_off[h];
      ldq = p.sqn;
      ldk = p.skn;
      ldv = p.svn;
    } else {
      if (converted != bh) {
        const T* qs = qp + b * p.sqb + p.qk_off[h];
        const T* ks = kp + b * p.skb + p.qk_off[h];
        const T* vs = vp + b * p.svb + p.v_off[h];
        for (int64_t i = 0; i < p.Nq; ++i) {
          for (int64_t d = 0; d < dq; ++d) Qc[i * dq + d] = static_cast<A>(qs[i * p.sqn + d]);
        }
        for (int64_t j = 0; j < p.Nk; ++j) {
          for (int64_t d = 0; d < dq; ++d) Kc[j * dq + d] = static_cast<A>(ks[j * p.skn + d]);
          for (int64_t c = 0; c < dv; ++c) Vc[j * dv + c] = static_cast<A>(vs[j * p.svn + c]);
        }
        converted = bh;
      }
      qq = Qc;
      kk = Kc;
      vv = Vc;
      ldq = dq;
      ldk = dq;
      ldv = dv;
    }
    if (dq == 0) {  // zero scores: uniform attention, the mean of v over the keys
      for (int64_t c = 0; c < dv; ++c) Ot[c] = A(0);
      for (int64_t j = 0; j < p.Nk; ++j) {
        for (int64_t c = 0; c < dv; ++c) Ot[c] += vv[j * ldv + c];
      }
      for (int64_t c = 0; c < dv; ++c) Ot[c] /= static_cast<A>(p.Nk);
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t c = 0; c < dv; ++c) ob[i * p.son + c] = static_cast<T>(Ot[c]);
      }
      continue;
    }
    // Q^T [dq][Mp], scaled; the padding queries get zero scores (their outputs are dropped)
    transpose<A>(qq + i0 * ldq, ldq, Qt, Mp, M, dq);
    const Vec scale(static_cast<A>(p.scale[h]));
    for (int64_t d = 0; d < dq; ++d) {
      A* row = Qt + d * Mp;
      for (int64_t i = M; i < Mp; ++i) row[i] = A(0);
      for (int64_t i = 0; i < Mp; i += L) (Vec::loadu(row + i) * scale).store(row + i);
    }
    for (int64_t i = 0; i < Mp; ++i) m[i] = -std::numeric_limits<A>::infinity();
    for (int64_t kblock = 0; kblock < p.n_kblocks; ++kblock) {
      int64_t j0 = 0, kb = 0;
      key_block(p, kblock, &j0, &kb);
      gemm_bcast<A>(kb, nvec, dq, kk + j0 * ldk, ldk, 1, Qt, Mp, S, Mp, false);
      softmax_block<A>(S, kb, nvec, Mp, m, l, Ot, dv, j0 == 0);
      gemm_bcast<A>(dv, nvec, kb, vv + j0 * ldv, 1, ldv, S, Mp, Ot, Mp, j0 > 0);
    }
    // O = (O^T / l)^T, written into the packed output (through a float buffer for 16 bits)
    for (int64_t v = 0; v < nvec; ++v) (Vec(A(1)) / Vec::loadu(l + v * L)).store(l + v * L);
    for (int64_t c = 0; c < dv; ++c) {
      A* row = Ot + c * Mp;
      for (int64_t i = 0; i < Mp; i += L) (Vec::loadu(row + i) * Vec::loadu(l + i)).store(row + i);
    }
    if constexpr (std::is_same_v<T, A>) {
      transpose<A>(Ot, Mp, ob, p.son, dv, M);
    } else {
      transpose<A>(Ot, Mp, S, dv, dv, M);  // S is free again: [M][dv] fits
      for (int64_t i = 0; i < M; ++i) {
        for (int64_t c = 0; c < dv; ++c) ob[i * p.son + c] = static_cast<T>(S[i * dv + c]);
      }
    }
  }
}

}  // namespace

void run_items(const Problem& p, int64_t item0, int64_t item1, void* ws) {
  switch (p.dtype) {
    case Dtype::kFloat: run_items_t<float, float>(p, item0, item1, ws); break;
    case Dtype::kDouble: run_items_t<double, double>(p, item0, item1, ws); break;
    case Dtype::kBFloat16: run_items_t<c10::BFloat16, float>(p, item0, item1, ws); break;
    case Dtype::kHalf: run_items_t<c10::Half, float>(p, item0, item1, ws); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace varlen_cpu
}  // namespace pyengine
