// Shared definitions of the fastmup C++/CUDA backends.
//
// Everything here compiles both under nvcc (device and host code) and under a
// plain C++17 host compiler: FASTMUP_HD marks the functions that run on both.
// Storage types are fp32 (`float`), bf16 and fp16; the 16-bit types are kept
// as raw bits (`Bf16`, `Fp16`), converted to fp32 for the math and rounded
// back once on store, round-to-nearest-even like torch's `.to(dtype)`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTMUP_HD __host__ __device__
#define FASTMUP_INLINE __forceinline__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define FASTMUP_HD
#define FASTMUP_INLINE inline __attribute__((always_inline))
#endif

namespace fastmup {

// dtype codes shared with fastmup/ext/__init__.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};
static_assert(sizeof(Bf16) == 2 && sizeof(Fp16) == 2, "16-bit storage types must be 2 bytes");

// ---------------------------------------------------------------------------
// bit casts between float and its bits: CUDA's intrinsics on the device; on
// the host a memcpy, which compilers turn into a register move (the
// standard's std::bit_cast is C++20)
// ---------------------------------------------------------------------------
template <class To, class From>
FASTMUP_HD FASTMUP_INLINE To bit_cast(From x) {
  static_assert(std::is_same<To, float>::value != std::is_same<From, float>::value && sizeof(To) == 4 && sizeof(From) == 4,
                "bit_cast: between float and a 32-bit integer");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<To, float>::value) return __uint_as_float(x);
  else return __float_as_uint(x);
#else
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
#endif
}

FASTMUP_HD FASTMUP_INLINE uint32_t float_bits(float f) { return bit_cast<uint32_t>(f); }
FASTMUP_HD FASTMUP_INLINE float bits_float(uint32_t u) { return bit_cast<float>(u); }

// ---------------------------------------------------------------------------
// bf16 <-> fp32.  bf16 is the top half of an fp32; rounding is to nearest,
// ties to even, with NaN mapped to the quiet NaN 0x7fc0, exactly as
// c10::detail::round_to_nearest_even (torch's `.to(torch.bfloat16)`).
// ---------------------------------------------------------------------------
FASTMUP_HD FASTMUP_INLINE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

FASTMUP_HD FASTMUP_INLINE uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // Written as a select (not a branch) so that host loops vectorise.
  return static_cast<uint16_t>((f != f) ? 0x7fc0u : rounded);
#endif
}

// ---------------------------------------------------------------------------
// fp16 <-> fp32.  Host versions are branch-free bit manipulation (so the
// loops vectorise on any x86-64/aarch64 baseline, no F16C needed), exact for
// every input: subnormals, overflow to inf and ties-to-even rounding included.
// ---------------------------------------------------------------------------
FASTMUP_HD FASTMUP_INLINE float fp16_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa in fp32 position
  const uint32_t exp = em & 0x0f800000u;
  // normal numbers: rebias the exponent by 127 - 15
  const uint32_t normal = em + ((127u - 15u) << 23);
  // inf / NaN: exponent all ones
  const uint32_t infnan = em + ((255u - 31u) << 23);
  // zero / subnormal: m * 2^-24, computed exactly as (magic + m) - magic
  const float sub = bits_float(em + (113u << 23)) - bits_float(113u << 23);
  const uint32_t subbits = float_bits(sub);
  const uint32_t mag = (exp == 0x0f800000u) ? infnan : (exp == 0u) ? subbits : normal;
  return bits_float(mag | sign);
#endif
}

FASTMUP_HD FASTMUP_INLINE uint16_t float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // |f| >= 65520 rounds to inf (65520 is the tie between 65504 and 2^16); NaN stays a quiet NaN
  const uint32_t big = (a > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  // |f| < 2^-14: the result is subnormal; let the fp32 adder round
  // (a + 0.5) in the last place, ties to even, then read the low bits.
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t small = float_bits(bits_float(a) + bits_float(denorm_magic)) - denorm_magic;
  // normal: rebias, round to nearest even on the 13 dropped bits
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + odd) >> 13;
  const uint32_t mag = (a >= 0x477ff000u) ? big : (a < 0x38800000u) ? small : normal;
  return static_cast<uint16_t>(mag | sign);
#endif
}

// ---------------------------------------------------------------------------
// storage <-> fp32
// ---------------------------------------------------------------------------
FASTMUP_HD FASTMUP_INLINE float to_float(float x) { return x; }
FASTMUP_HD FASTMUP_INLINE float to_float(Bf16 x) { return bf16_to_float(x.bits); }
FASTMUP_HD FASTMUP_INLINE float to_float(Fp16 x) { return fp16_to_float(x.bits); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  FASTMUP_HD static FASTMUP_INLINE float from(float x) { return x; }
};
template <>
struct Store<Bf16> {
  FASTMUP_HD static FASTMUP_INLINE Bf16 from(float x) { return Bf16{float_to_bf16(x)}; }
};
template <>
struct Store<Fp16> {
  FASTMUP_HD static FASTMUP_INLINE Fp16 from(float x) { return Fp16{float_to_fp16(x)}; }
};

template <typename T>
FASTMUP_HD FASTMUP_INLINE T from_float(float x) {
  return Store<T>::from(x);
}

// torch.maximum semantics: NaN in either operand propagates.
FASTMUP_HD FASTMUP_INLINE float max_propagate_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// ---------------------------------------------------------------------------
// The launch description shared by the host and CUDA backends.  Every pointer
// is a raw address handed over from Python (data_ptr()s); nothing here knows
// about torch.  Per-tensor tables have `ntensors` entries.
// ---------------------------------------------------------------------------
constexpr int kMaxStates = 3;

struct MultiTensorArgs {
  int64_t ntensors = 0;
  int64_t nblocks = 0;                        // entries of the block map
  int64_t block = 0;                          // elements per block-map entry
  const int32_t* tensor_of_block = nullptr;   // [nblocks]
  const int64_t* start_of_block = nullptr;    // [nblocks]
  const int64_t* numels = nullptr;            // [ntensors]
  const int64_t* param_ptrs = nullptr;        // [ntensors] addresses
  const int64_t* grad_ptrs = nullptr;         // [ntensors] addresses
  const int64_t* state_ptrs[kMaxStates] = {nullptr, nullptr, nullptr};  // [ntensors] each, or null: no such buffer
  const double* rows = nullptr;               // [ntensors, ncols] hyperparameters
  int64_t ncols = 0;
  const float* steps = nullptr;               // [ntensors], already incremented
  const float* grad_scale = nullptr;          // [1] or null
  const float* found_inf = nullptr;           // [1] or null
  const float* grad_clip = nullptr;           // [1] or null: a deferred clip coefficient (grad_norm.h)
  int param_dtype = kFloat32;
  int grad_dtype = kFloat32;
  int state_dtype = kFloat32;
  // Algorithms that advance a per-tensor scalar state in the launch (ESGD-M):
  double* scalar_state[3] = {nullptr, nullptr, nullptr};  // [ntensors] each: old values in, new values out
  float* steps_out = nullptr;                 // [ntensors] where the new step counts go (may alias steps)
  int32_t* tickets = nullptr;                 // CUDA: [ntensors] per-tensor counters, zero between launches
  int hvp_step = 0;                           // ESGD-M: this step has Hessian-vector products
  // How the parameters are stored (rounding.h, enum Storage; bf16/fp16 params only):
  int storage = 0;
  const int64_t* storage_ptrs = nullptr;      // [ntensors] addresses of the fp32 masters / int16 remainders
  const int64_t* tensor_ids = nullptr;        // [ntensors] positions in the optimizer's list (stochastic rounding)
  uint32_t rounding_prefix = 0;               // the seed's part of the rounding bits' hash
};

// Undoing the loss scale of the gradients (torch.amp's GradScaler): g / scale.
// A scale that is a normal power of two (GradScaler's always are: 2^16, grown
// and backed off by factors of 2), or no scale (1), has an exact reciprocal,
// and then g * (1/scale) IS g / scale for every g, to the bit: both are the
// exact quotient rounded once.  One multiply instead of an IEEE division,
// which is the costliest instruction of an update on a CPU and some ten
// instructions on a GPU.  Any other scale is divided by.
struct Unscale {
  float factor;   // 1/scale, exact (used when `exact`)
  float divisor;  // scale
  bool exact;
};

FASTMUP_HD FASTMUP_INLINE Unscale make_unscale(float scale) {
  const uint32_t bits = float_bits(scale);
  const uint32_t exponent = (bits >> 23) & 0xffu;
  Unscale u;
  u.divisor = scale;
  // zero mantissa, exponent neither 0 (zero, subnormal) nor 255 (inf, NaN):
  // +-2^k with k in [-126, 127], whose reciprocal 2^-k is a float (2^-127 a
  // subnormal one), built from the bits (no division, no slow path)
  u.exact = (bits & 0x7fffffu) == 0u && exponent != 0u && exponent != 0xffu;
  const uint32_t inverse = exponent <= 253u ? (254u - exponent) << 23 : 0x00400000u;
  u.factor = u.exact ? bits_float((bits & 0x80000000u) | inverse) : 1.0f;
  return u;
}

// Defaults of the per-algorithm functor interface (Adam, SGD): the scalars
// come from the row and the (already advanced) step; every state in the mask
// is read and written; no scalar state is advanced by the launch.
struct OpDefaults {
  static constexpr int kReadOnlyMask = 0;
  // Mask bit above the state bits: the gradient (and HVP) are divided by
  // the loss scale; without it they are multiplied by its exact reciprocal
  // (see Unscale; 1 when there is no scale, with maximize's sign).
  static constexpr int kGradDivide = 1 << 3;
  // Bits from kFirstOpFlag up are the algorithm's own compile-time variants
  // (with_flags below).
  static constexpr int kFirstOpFlag = 1 << 4;
  static constexpr bool kAdvancesScalars = false;
  // The state slots an update with mask MASK stores: those it reads, less
  // the read-only inputs.
  template <int MASK>
  static constexpr int stored() {
    return MASK & 0b111 & ~kReadOnlyMask;
  }
  FASTMUP_HD static FASTMUP_INLINE void store_advanced(const MultiTensorArgs&, int64_t) {}
  // Calls f(std::integral_constant<int, MASK | flags>{}) with the algorithm's
  // own variant flags for these scalars (none by default).
  template <int MASK, class Scalars, class F>
  FASTMUP_HD static FASTMUP_INLINE void with_flags(const Scalars&, const F& f) {
    f(std::integral_constant<int, MASK>{});
  }
};

// Defaults of an algorithm whose per-tensor scalars come from its row of the
// table and its (already advanced) step count alone (Adam, SGD): the launch
// description's view of Op::prepare(row, step, unscale).  (Op brings this
// prepare into its scope with a using-declaration beside its own.)
template <class Op>
struct RowStepOp : OpDefaults {
  FASTMUP_HD static FASTMUP_INLINE auto prepare(const MultiTensorArgs& a, int64_t t, const Unscale& unscale) {
    return Op::prepare(a.rows + t * a.ncols, a.steps[t], unscale);
  }
};

// x / grad_scale in the variant MASK names (OpDefaults): the division or
// the exact multiply.
template <int MASK>
FASTMUP_HD FASTMUP_INLINE float unscaled(float x, float factor, float divisor) {
  return (MASK & OpDefaults::kGradDivide) ? x / divisor : x * factor;
}

// One tensor's unscaling of its gradient (Unscale) with a sign: maximize's
// negation rides on it, as -(g / scale) == g / -scale and -(g * f) ==
// g * -f exactly.  Every functor's Scalars holds one.
struct GradScaling {
  float factor;   // +-1/grad_scale (exact)
  float divisor;  // +-grad_scale (a scale without an exact reciprocal)

  FASTMUP_HD static FASTMUP_INLINE GradScaling of(const Unscale& unscale, bool negate) {
    return GradScaling{negate ? -unscale.factor : unscale.factor, negate ? -unscale.divisor : unscale.divisor};
  }
  // +-x / grad_scale in the variant MASK
  template <int MASK>
  FASTMUP_HD FASTMUP_INLINE float apply(float x) const {
    return unscaled<MASK>(x, factor, divisor);
  }
};

// Calls f(std::integral_constant<int, MASK>{}) with the update variant of a
// tensor: its state mask (Op::mask), how its gradient is unscaled, and the
// algorithm's own flags.  The one place both drivers (host, CUDA) choose.
template <class Op, class F>
FASTMUP_HD FASTMUP_INLINE void dispatch_variant(const typename Op::Scalars& s, const Unscale& unscale, const F& f) {
  constexpr int kFull = Op::kMaskFull, kBase = Op::kMaskBase, kDiv = OpDefaults::kGradDivide;
  const bool full = Op::mask(s) == kFull;
  if (!unscale.exact) {
    if (full) Op::template with_flags<kFull | kDiv>(s, f);
    else Op::template with_flags<kBase | kDiv>(s, f);
  } else if (full) {
    Op::template with_flags<kFull>(s, f);
  } else {
    Op::template with_flags<kBase>(s, f);
  }
}

// x / c for a per-tensor divisor c with |c| < 2 (Adam's and ESGD-M's
// sqrt(1 - beta2^t), in [0, 1]), rounded as the fp32 IEEE division rounds it:
// one double multiply by RN64(1/c) and one rounding to fp32, in place of an
// fp32 division (on a GPU some ten instructions and a slow path; the
// reciprocal is computed once per tensor).
//
// Why the bits are the same.  Write q = x/c exactly and y = RN64(x RN64(1/c))
// = q(1 + e), |e| < 2^-52 (two double roundings).  RN32(y) and RN32(q) can
// differ only if an fp32 rounding boundary m (a midpoint between neighbours;
// the overflow threshold is one) lies between y and q or at q.  Write x = X 2^a
// and c = C 2^b, X and C < 2^24 integers, C odd, a >= -149.
// * m in a normal binade [2^k, 2^(k+1)): m = M 2^(k-24), M odd in
//   (2^24, 2^25).  x - m c = X 2^a - M C 2^(k-24+b) is not 0 (the odd part of
//   M C has more than 24 bits) and is a multiple of 2^min(a, k-24+b), so
//   |q - m| > 2^(k-48) > 2^-49 m whichever term is smaller.
// * m in the subnormal range: m = M 2^-150, M odd.  As |c| < 2, b <= 0 and
//   x - m c = 2^(b-150) (X 2^(a+150-b) - M C) is 2^(b-150) times an even minus
//   an odd integer: |q - m| >= 2^(b-150) / c > 2^-174 > 2^-48 q.
// Either way q is more than 2^-49 q from every boundary, farther than y: both
// round alike.  0, inf and NaN give what the division gives (c = 0 included:
// 1/c = inf, and x * inf is x / 0).  tests/ext/test_shared_math.py checks it.
struct Divisor {
  double inverse;  // RN64(1 / c)

  FASTMUP_HD static FASTMUP_INLINE Divisor of(float c) { return Divisor{1.0 / static_cast<double>(c)}; }
  FASTMUP_HD FASTMUP_INLINE float operator()(float x) const {
    return static_cast<float>(static_cast<double>(x) * inverse);
  }
};

// torch.lerp(a, b, w) for a per-tensor weight w in [0, 1] (a 1 - beta), as
// torch evaluates it in fp32: a + w*(b - a) for w < 0.5, else
// b - (b - a)*(1 - w).  Both are written as base + coef*(b - a)
// (b - y*(1-w) == b + y*(-(1-w)) exactly: negation is exact), so the
// per-element work is one select, one multiply and one add whichever branch
// the weight picks.
struct Lerp {
  float coef;  // w, or -(1 - w)
  bool from_a;  // the base is a (w < 0.5) or b

  FASTMUP_HD static FASTMUP_INLINE Lerp of(float w) {
    Lerp l;
    l.from_a = w < 0.5f;
    l.coef = l.from_a ? w : -(1.0f - w);
    return l;
  }
  FASTMUP_HD FASTMUP_INLINE float operator()(float a, float b) const {
    const float diff = b - a;
    return (from_a ? a : b) + coef * diff;
  }
};

// ---------------------------------------------------------------------------
// Host side of every launch (host backend and CUDA launcher alike)
// ---------------------------------------------------------------------------
// Calls f(T{}) with T the storage type of dtype code `code`.
template <class F>
void dispatch_dtype(int code, const char* what, const F& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(Bf16{}); break;
    case kFloat16: f(Fp16{}); break;
    default: throw std::invalid_argument(std::string("fastmup: unsupported ") + what + " dtype code " + std::to_string(code));
  }
}

// Calls f(P{}, G{}, S{}) with the launch's param, grad and state storage types.
template <class F>
void dispatch_dtypes(const MultiTensorArgs& a, const F& f) {
  dispatch_dtype(a.param_dtype, "param", [&](auto p) {
    dispatch_dtype(a.grad_dtype, "grad", [&](auto g) {
      dispatch_dtype(a.state_dtype, "state", [&](auto s) { f(p, g, s); });
    });
  });
}

// The hyperparameter table has the columns Op reads.
template <class Op>
void check_columns(const MultiTensorArgs& a) {
  if (a.ncols != Op::kNumCols)
    throw std::invalid_argument("fastmup: the hyperparameter table has " + std::to_string(a.ncols) + " columns, expected " +
                                std::to_string(static_cast<int>(Op::kNumCols)));
}

// The storage type of state slot 2 of Op: a read-only slot holds an input in
// the gradient's dtype (ESGD-M's HVP), read as such so that it is never
// rounded to a narrower state dtype; otherwise it is state like the others.
template <class Op, class G, class S>
using Slot2 = typename std::conditional<(Op::kReadOnlyMask & 4) != 0, G, S>::type;

}  // namespace fastmup
