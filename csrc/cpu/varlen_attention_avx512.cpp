// The AVX512 build of the CPU varlen-attention kernel (csrc/cpu/varlen_attention_kernel.h); the
// op (csrc/cpu/varlen_attention.cpp) runs it where the CPU supports it.
#define PYENGINE_VEC_ISA_AVX512
// clang-format off
#include "cpu/vec_isa_begin.h"
#if PYENGINE_VEC_ISA_X86
#include "cpu/varlen_attention_kernel.h"
#include "cpu/vec_isa_end.h"
#else
// not x86-64: never selected (varlen_attention.cpp checks the CPU), so the baseline build
#include "cpu/varlen_attention_cpu.h"
void pyengine::varlen_cpu::AVX512::run_items(const Problem& p, int64_t item0, int64_t item1,
                                              void* ws) {
  DEFAULT::run_items(p, item0, item1, ws);
}
#endif
// clang-format on
