// The DEFAULT build of the CPU varlen-attention kernel (csrc/cpu/varlen_attention_kernel.h); the
// op (csrc/cpu/varlen_attention.cpp) runs it where the CPU supports it.

// clang-format off
#include "cpu/vec_isa_begin.h"
#include "cpu/varlen_attention_kernel.h"
#include "cpu/vec_isa_end.h"
// clang-format on
