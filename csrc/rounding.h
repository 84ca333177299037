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
