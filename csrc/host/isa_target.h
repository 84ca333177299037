// The host loops are compiled twice, for the build's baseline ISA and, on
// x86-64 with GCC or clang, for AVX2, and picked at run time (isa.cpp).  What
// differs between the compilers is only how a region of functions is given
// the AVX2 target; these macros say it once, and isa_variants.inc compiles a
// loop file in both namespaces with them:
//
//   #define FASTMUP_ISA_LOOPS "loops.inc"
//   #include "isa_variants.inc"
#pragma once

#if !defined(FASTMUP_NO_AVX2) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMUP_HAVE_AVX2 1
#if defined(__clang__)
#define FASTMUP_AVX2_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx2\"))), apply_to = function)")
#define FASTMUP_AVX2_END _Pragma("clang attribute pop")
#else
#define FASTMUP_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2\")")
#define FASTMUP_AVX2_END _Pragma("GCC pop_options")
#endif
#else
#define FASTMUP_HAVE_AVX2 0
#endif
