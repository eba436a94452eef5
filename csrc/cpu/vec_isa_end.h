// Ends the target region that cpu/vec_isa_begin.h opened (Clang needs the pop).
#if defined(__clang__) && defined(CPU_CAPABILITY_AVX512) || \
    defined(__clang__) && defined(CPU_CAPABILITY_AVX2)
#pragma clang attribute pop
#endif
