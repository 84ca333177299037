// How an update's fp32 result becomes the stored bf16/fp16 parameter, for
// the storage modes of fastmup.optim.precision (whose docstring, and
// ALGORITHMS.md section 7, give the math): stochastic rounding with
// counter-based bits, and the exact bf16 + 16-bit remainder split of an fp32
// master weight.  Integer operations on the bit patterns only (no float
// rounding mode involved), so host and device, and the Triton and torch
// versions, give the same bits.
#pragma once

#include "common.h"

namespace fastmup {

// ---------------------------------------------------------------------------
// The counter-based hash of fastmup.optim.rademacher (uint32 arithmetic
// modulo 2^32).
// ---------------------------------------------------------------------------
namespace hash {
constexpr uint32_t kIV = 0x6A09E667u;
constexpr uint32_t kMul1 = 0x21F0AAADu;
constexpr uint32_t kMul2 = 0x735A2D97u;
// The top bit of the counter's high word marks the rounding draws.
constexpr uint32_t kRoundingCounterHi = 0x80000000u;

// mix32 after its first xorshift (x ^= x >> 16), for callers that do that
// step once for many words.
FASTMUP_HD FASTMUP_INLINE uint32_t mix32_rest(uint32_t x) {
  x *= kMul1;
  x ^= x >> 15;
  x *= kMul2;
  x ^= x >> 15;
  return x;
}

FASTMUP_HD FASTMUP_INLINE uint32_t mix32(uint32_t x) { return mix32_rest(x ^ (x >> 16)); }

FASTMUP_HD FASTMUP_INLINE uint32_t absorb(uint32_t h, uint32_t w) { return mix32(h ^ w); }
}  // namespace hash

// The per-tensor key of the rounding bits of one step (computed once per
// tensor and run of 2^32 elements), then one mix per pair of elements: the
// word of pair k = element_lo >> 1 gives element 2k its low half and 2k + 1
// its high half (fastmup.optim.precision's docstring).
struct RoundingKey {
  uint32_t key;

  // seed_prefix = absorb(absorb(IV, seed_lo), seed_hi), computed on the host.
  FASTMUP_HD static FASTMUP_INLINE RoundingKey of(uint32_t seed_prefix, uint32_t step, uint32_t tensor_id,
                                                  uint32_t element_hi) {
    uint32_t h = hash::absorb(seed_prefix, step);
    h = hash::absorb(h, hash::kRoundingCounterHi);
    h = hash::absorb(h, tensor_id);
    return RoundingKey{hash::absorb(h, element_hi)};
  }
  // The 32-bit word of the pair whose index has low word `pair_lo`.
  FASTMUP_HD FASTMUP_INLINE uint32_t pair_word(uint32_t pair_lo) const { return hash::mix32(pair_lo ^ key); }
  // The 16 random bits of the element whose index has low word `element_lo`.
  FASTMUP_HD FASTMUP_INLINE uint32_t bits(uint32_t element_lo) const {
    return (pair_word(element_lo >> 1) >> ((element_lo & 1u) << 4)) & 0xffffu;
  }

  // The same words with the mix's first step done once for a run of pairs:
  // for pair_lo = base ^ j with j < 2^16 (base a multiple of a power of two
  // above j), k = pair_lo ^ key has k >> 16 = (base ^ key) >> 16, so
  //   pair_word(base ^ j) = word(head(base), j).
  FASTMUP_HD FASTMUP_INLINE uint32_t head(uint32_t base) const {
    const uint32_t k = base ^ key;
    return k ^ (k >> 16);
  }
  FASTMUP_HD static FASTMUP_INLINE uint32_t word(uint32_t head, uint32_t j) { return hash::mix32_rest(head ^ j); }
};

// ---------------------------------------------------------------------------
// Stochastic rounding of fp32 x with 16 random bits r (in [0, 2^16)).
// ---------------------------------------------------------------------------
// bf16: b = (u + r) >> 16; inf stays inf, NaN -> 0x7fc0 (torch's).
FASTMUP_HD FASTMUP_INLINE uint16_t stochastic_bf16(float x, uint32_t r) {
  const uint32_t u = float_bits(x);
  const uint32_t b = (u + r) >> 16;
  return static_cast<uint16_t>((x != x) ? 0x7fc0u : b);
}

// fp16 from the hash word w (r = w >> 16): normals (and overflow) add 13
// random bits below the 10 kept and truncate; subnormals (|x| < 2^-14) work
// in units of 2^-24: up iff r + floor(2^16 frac) >= 2^16; NaN -> sign |
// 0x7e00.  All of it as one sum (s + r) >> 16 (fewer operations than the
// cases apart), where s holds |x| as the fp16 bits it truncates to (high
// half) and the dropped part of an ulp times 2^16 (low half), the sign in
// bit 31 (the sum never carries into it):
//  * normals and overflow: s = 8 (bits(min(|x|, 2^16)) - bits(2^-15)), the
//    fp32 pattern on fp16's exponent bias with its 13 dropped bits at the top
//    of the low half, so (s + r) >> 16 = (a + (r >> 3) - (112 << 23)) >> 13,
//    and 0x7c00 (inf) from 2^16 on;
//  * subnormals: s = floor(|x| 2^40) = floor(q) 2^16 + floor(2^16 frac(q)),
//    q = |x| 2^24 (exact), the form above;
//  * NaN: the clamp to bits(1.5 2^16) gives s = 0x7e00 2^16.
// (Both cases are computed: the normal one's sum wraps modulo 2^32 only where
// the subnormal case is taken, and the float clamp keeps the conversion in
// range.)
FASTMUP_HD FASTMUP_INLINE uint16_t stochastic_fp16_word(float x, uint32_t w) {
  const uint32_t u = float_bits(x);
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t m = (a > 0x7f800000u) ? 0x47c00000u : (a < 0x47800000u ? a : 0x47800000u);
  const uint32_t normal = (m << 3) + 0x40000000u;
  const float ax = bits_float(a);
  const float small = ax < 6.103515625e-05f ? ax : 6.103515625e-05f;  // NaN: never taken below
  // exact, in [0, 2^26): the signed conversion, which vectorises on the host
  const uint32_t sub = static_cast<uint32_t>(static_cast<int32_t>(small * 1099511627776.0f));
  const uint32_t s = ((a < 0x38800000u) ? sub : normal) | (u & 0x80000000u);
  return static_cast<uint16_t>((s + (w >> 16)) >> 16);
}

// fp16 with 16 random bits r.
FASTMUP_HD FASTMUP_INLINE uint16_t stochastic_fp16(float x, uint32_t r) { return stochastic_fp16_word(x, r << 16); }

template <typename T>
struct StochasticStore;
template <>
struct StochasticStore<Bf16> {
  FASTMUP_HD static FASTMUP_INLINE Bf16 from(float x, uint32_t r) { return Bf16{stochastic_bf16(x, r)}; }
};
template <>
struct StochasticStore<Fp16> {
  FASTMUP_HD static FASTMUP_INLINE Fp16 from(float x, uint32_t r) { return Fp16{stochastic_fp16(x, r)}; }
};

// ---------------------------------------------------------------------------
// Pairs and packs: the rounding of the CUDA kernels, where elements 2k and
// 2k + 1 of a tensor take the two halves of one hash word w (RoundingKey),
// and a pair's two 16-bit results go out as one 32-bit word (element 2k in
// the low half).  Each is the same as stochastic_bf16 / stochastic_fp16_word
// on the two halves, bit for bit (tests/ext/test_rounding.py runs them on
// the host), in fewer instructions: a cheap form that is exact for all but
// rare inputs, a check of those that costs about one instruction per element,
// and the exact form out of line for a pair or pack that fails it.
// ---------------------------------------------------------------------------
#if defined(__CUDA_ARCH__)
#define FASTMUP_COLD __noinline__
#else
#define FASTMUP_COLD __attribute__((noinline))
#endif
#if defined(__CUDACC__)
#define FASTMUP_UNROLL _Pragma("unroll")
#else
#define FASTMUP_UNROLL
#endif

// (lo >> 16) | (hi & 0xffff0000): the high halves of two words, one byte
// permute on the device.
FASTMUP_HD FASTMUP_INLINE uint32_t high_halves(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(lo, hi, 0x7632);
#else
  return (lo >> 16) | (hi & 0xffff0000u);
#endif
}

// The exact pairs, for any inputs.
FASTMUP_HD FASTMUP_INLINE uint32_t stochastic_bf16_pair(float x0, float x1, uint32_t w) {
  return uint32_t(stochastic_bf16(x0, w & 0xffffu)) | (uint32_t(stochastic_bf16(x1, w >> 16)) << 16);
}
FASTMUP_HD FASTMUP_INLINE uint32_t stochastic_fp16_pair(float x0, float x1, uint32_t w) {
  return uint32_t(stochastic_fp16_word(x0, w << 16)) | (uint32_t(stochastic_fp16_word(x1, w)) << 16);
}

// bf16: (u + r) >> 16 of both halves, packed by one permute.  Exact unless
// x0 or x1 is NaN (whose sum can carry out of the NaN range; the exact form
// gives 0x7fc0).
FASTMUP_HD FASTMUP_INLINE uint32_t dithered_bf16_pair(float x0, float x1, uint32_t w) {
  return high_halves(float_bits(x0) + (w & 0xffffu), float_bits(x1) + (w >> 16));
}

// fp16 round-toward-zero of two fp32 patterns (lo into the low half), the
// device's cvt.rz.f16x2.f32.  The host form is the same conversion: the
// dropped bits truncated (normals), subnormals from the exact |v| 2^24,
// finite values from 65504 on saturating to 65504, inf and NaN kept.
FASTMUP_HD FASTMUP_INLINE uint32_t fp16_rz(uint32_t u) {
  const uint32_t a = u & 0x7fffffffu;
  uint32_t m;
  if (a > 0x7f800000u) m = 0x7e00u;
  else if (a == 0x7f800000u) m = 0x7c00u;
  else if (a >= 0x477fe000u) m = 0x7bffu;
  else if (a >= 0x38800000u) m = (a - 0x38000000u) >> 13;
  else m = static_cast<uint32_t>(bits_float(a) * 16777216.0f);
  return ((u >> 16) & 0x8000u) | m;
}
FASTMUP_HD FASTMUP_INLINE uint32_t fp16x2_rz(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t d;
  asm("cvt.rz.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(__uint_as_float(hi)), "f"(__uint_as_float(lo)));
  return d;
#elif defined(__CUDA_ARCH__)  // no paired conversion before sm_80
  unsigned short d0, d1;
  asm("cvt.rz.f16.f32 %0, %1;" : "=h"(d0) : "f"(__uint_as_float(lo)));
  asm("cvt.rz.f16.f32 %0, %1;" : "=h"(d1) : "f"(__uint_as_float(hi)));
  return uint32_t(d0) | (uint32_t(d1) << 16);
#else
  return fp16_rz(lo) | (fp16_rz(hi) << 16);
#endif
}

// fp16: the 13 random bits r >> 3 added below fp16's 10 mantissa bits, then
// truncated by the conversion.  For |x| in [2^-14, 65504] (fp16's normal
// range) that is stochastic_fp16_word's normal case: the sum stays below
// 2^16 (65504 + 2^13 - 1 ulps of fp32 < 65536) and in the normal range, so
// truncating it drops exactly the 13 bits ((a + (r >> 3) - bits(2^-15)) >>
// 13, the sign apart).  Exact when fp16_pair_exact says so.
FASTMUP_HD FASTMUP_INLINE uint32_t truncated_fp16_pair(float x0, float x1, uint32_t w) {
  return fp16x2_rz(float_bits(x0) + ((w & 0xffffu) >> 3), float_bits(x1) + (w >> 19));
}

// Whether both halves of truncated_fp16_pair's result h are exact: their
// magnitudes in [0x0401, 0x7bfe].  A truncated sum of that magnitude is at
// least bits(2^-14) + 2^13 (so |x| > 2^-14 however large its dither) and
// below bits(65504) (so |x| < 65504); every input outside the range gives a
// magnitude outside it (below 2^-14: under 0x0401, as the dither adds under
// 2^-25; from 65504 on 0x7bff, inf 0x7c00, NaN more; NaN patterns whose sum
// carries into the sign bit, or out of it, a tiny value), and the few exact
// ones at the edges (0x0400, 0x7bff) take the exact form.  One packed
// half-precision compare per bound on the device.
FASTMUP_HD FASTMUP_INLINE bool fp16_pair_exact(uint32_t h) {
#if defined(__CUDA_ARCH__)
  uint32_t ok;
  asm("{\n\t.reg .b32 m, lo, hi;\n\t.reg .pred p, q, r, s;\n\t"
      "abs.f16x2 m, %1;\n\t"
      "mov.b32 lo, 0x04010401;\n\t"
      "mov.b32 hi, 0x7bfe7bfe;\n\t"
      "setp.ge.f16x2 p|q, m, lo;\n\t"
      "setp.le.and.f16x2 r|s, m, hi, p;\n\t"
      "and.pred r, r, s;\n\t"
      "and.pred r, r, q;\n\t"
      "selp.u32 %0, 1, 0, r;\n\t}"
      : "=r"(ok) : "r"(h));
  return ok != 0;
#else
  const uint32_t m0 = h & 0x7fffu, m1 = (h >> 16) & 0x7fffu;
  return m0 - 0x0401u <= 0x7bfeu - 0x0401u && m1 - 0x0401u <= 0x7bfeu - 0x0401u;
#endif
}

// The pair forms of one parameter dtype: the cheap one (cheap), whether its
// result h is exact (exact: bf16, no NaN; fp16, the check of its result),
// and the exact form out of line (cold: the rare inputs, so that the code
// around its call stays the cheap form's).
template <class P>
struct PairRounding;
template <>
struct PairRounding<Bf16> {
  FASTMUP_HD static FASTMUP_INLINE uint32_t cheap(float x0, float x1, uint32_t w) { return dithered_bf16_pair(x0, x1, w); }
  FASTMUP_HD static FASTMUP_INLINE bool exact(float x0, float x1, uint32_t) { return !((x0 != x0) | (x1 != x1)); }
  FASTMUP_HD static FASTMUP_COLD uint32_t cold(float x0, float x1, uint32_t w) { return stochastic_bf16_pair(x0, x1, w); }
};
template <>
struct PairRounding<Fp16> {
  FASTMUP_HD static FASTMUP_INLINE uint32_t cheap(float x0, float x1, uint32_t w) { return truncated_fp16_pair(x0, x1, w); }
  FASTMUP_HD static FASTMUP_INLINE bool exact(float, float, uint32_t h) { return fp16_pair_exact(h); }
  FASTMUP_HD static FASTMUP_COLD uint32_t cold(float x0, float x1, uint32_t w) { return stochastic_fp16_pair(x0, x1, w); }
};

// One pair (x0: the even element) with its hash word w, as the packed bits
// of stochastic_bf16 / stochastic_fp16 of w's two halves.
template <class P>
FASTMUP_HD FASTMUP_INLINE uint32_t stochastic_pair(float x0, float x1, uint32_t w) {
  const uint32_t h = PairRounding<P>::cheap(x0, x1, w);
  return PairRounding<P>::exact(x0, x1, h) ? h : PairRounding<P>::cold(x0, x1, w);
}

// N consecutive elements (N even) whose first is the even element of pair
// j0 of a run with RoundingKey head `head` (pair j0 + k's word is
// RoundingKey::word(head, j0 ^ k): j0 a multiple of N / 2), as N / 2 packed
// words; one check for the pack, the exact form for all of it if it fails.
template <class P, int N>
FASTMUP_HD FASTMUP_INLINE void stochastic_pack(const float (&x)[N], uint32_t head, uint32_t j0, uint32_t (&out)[N / 2]) {
  static_assert(N % 2 == 0 && (N & (N - 1)) == 0, "a pack is a power-of-two number of pairs");
  const uint32_t h = head ^ j0;
  uint32_t w[N / 2];
  bool exact = true;
  FASTMUP_UNROLL
  for (int k = 0; k < N / 2; ++k) {
    w[k] = RoundingKey::word(h, static_cast<uint32_t>(k));
    out[k] = PairRounding<P>::cheap(x[2 * k], x[2 * k + 1], w[k]);
    exact &= PairRounding<P>::exact(x[2 * k], x[2 * k + 1], out[k]);
  }
  if (!exact) {
    FASTMUP_UNROLL
    for (int k = 0; k < N / 2; ++k) out[k] = PairRounding<P>::cold(x[2 * k], x[2 * k + 1], w[k]);
  }
}

// ---------------------------------------------------------------------------
// The exact split of an fp32 master weight into a bf16 parameter (nearest,
// ties away from zero) and a 16-bit remainder (the low half of the bits):
// hi = u >> 16, lo = u & 0xffff, c = lo >> 15, b = hi + c, except for the two
// NaN ranges swapped so that every quiet NaN shows as a NaN parameter.
// ---------------------------------------------------------------------------
FASTMUP_HD FASTMUP_INLINE uint16_t remainder_param_bits(uint32_t u) {
  const uint32_t hi = u >> 16, c = (u >> 15) & 1u;
  const uint32_t m = hi & 0x7fffu, s = hi & 0x8000u;
  uint32_t b = (hi + c) & 0xffffu;
  b = (c && m == 0x7fffu) ? (s | 0x7f81u) : b;  // quiet NaNs that would carry into -0 / +0
  b = (c && m == 0x7f80u) ? (s ^ 0x8000u) : b;  // the signalling NaNs that take that zero
  return static_cast<uint16_t>(b);
}

// The bf16 parameter of an fp32 master (the master_weights="fp32" copy).
FASTMUP_HD FASTMUP_INLINE uint16_t round_nearest_away_bf16(float x) { return remainder_param_bits(float_bits(x)); }

FASTMUP_HD FASTMUP_INLINE void encode_remainder(float x, uint16_t& param, int16_t& rem) {
  const uint32_t u = float_bits(x);
  param = remainder_param_bits(u);
  rem = static_cast<int16_t>(static_cast<uint16_t>(u & 0xffffu));
}

FASTMUP_HD FASTMUP_INLINE float decode_remainder(uint16_t param, int16_t rem) {
  const uint32_t b = param, lo = static_cast<uint16_t>(rem), c = lo >> 15;
  const uint32_t m = b & 0x7fffu, s = b & 0x8000u;
  uint32_t hi = (b - c) & 0xffffu;
  hi = (c && m == 0x7f81u) ? (s | 0x7fffu) : hi;
  hi = (c && m == 0u) ? ((s ^ 0x8000u) | 0x7f80u) : hi;
  return bits_float((hi << 16) | lo);
}

// ---------------------------------------------------------------------------
// The storage modes as the drivers see them (values of
// fastmup.ext's STORAGE_CODES): how a parameter is loaded and stored.
// ---------------------------------------------------------------------------
enum Storage : int { kNearest = 0, kStochastic = 1, kMaster = 2, kRemainder = 3 };

// One contiguous run of a tensor's elements as its storage mode sees it.
struct StorageRun {
  int mode = kNearest;
  void* aux = nullptr;    // the fp32 master or int16 remainder of the run's first element
  RoundingKey key{0u};
  uint64_t element0 = 0;  // the flat index of the run's first element
};

}  // namespace fastmup
