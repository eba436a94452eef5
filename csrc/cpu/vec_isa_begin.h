// Compile the rest of a translation unit for one vector ISA (as ATen compiles its CPU kernels
// once per CPU_CAPABILITY), without per-file compiler flags: the includer defines
// PYENGINE_VEC_ISA_AVX2 or PYENGINE_VEC_ISA_AVX512 (or neither: the baseline ISA) and then
// includes at::vec and its kernels.
//
// Headers whose inline functions live outside at::vec's per-ISA namespace are included first,
// with the baseline target, so that no function that other translation units share (c10,
// ATen/native/Math.h, the standard library) is emitted with AVX instructions; after that the
// target pragma applies to the rest of the file. The kernels keep to at::vec (namespaced by
// CPU_CAPABILITY), their own per-ISA namespace and raw pointers, and define no static
// initializers (ATen's "Do not compile initializers with AVX").
#pragma once

// GCC's avx512fintrin.h trips its own uninitialized-variable warnings (torch builds with
// -Wno-maybe-uninitialized; setup.py passes -Wno-unknown-pragmas for at::vec's `#pragma unroll`)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

// x86-64 with GCC or Clang only (elsewhere the includer builds its baseline variant alone)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYENGINE_VEC_ISA_X86 1
#else
#define PYENGINE_VEC_ISA_X86 0
#endif

// vector arguments and returns of at::vec's inline functions are internal to this file
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if defined(PYENGINE_VEC_ISA_AVX512) && PYENGINE_VEC_ISA_X86
// what ATen's AVX512 capability is compiled with (-mavx512f -mavx512bw -mavx512vl -mavx512dq
// -mfma) and what varlen_attention.cpp checks before it runs this code
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define PYENGINE_VEC_ISA_MACROS_AVX512 1
#define PYENGINE_VEC_ISA_MACROS_AVX2 1
#elif defined(PYENGINE_VEC_ISA_AVX2) && PYENGINE_VEC_ISA_X86
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
#define PYENGINE_VEC_ISA_MACROS_AVX2 1
#else
#define CPU_CAPABILITY DEFAULT
#endif

// The target pragmas enable the instructions but, unlike -m flags, define no feature macros;
// sleef.h (at::vec's exp, log, ...) declares its AVX2/AVX512 functions only under them.
#if defined(PYENGINE_VEC_ISA_MACROS_AVX512)
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
#if defined(PYENGINE_VEC_ISA_MACROS_AVX2)
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif
