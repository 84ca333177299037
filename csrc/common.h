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
// bit casts
// ---------------------------------------------------------------------------
FASTMUP_HD FASTMUP_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FASTMUP_HD FASTMUP_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

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
  int param_dtype = kFloat32;
  int grad_dtype = kFloat32;
  int state_dtype = kFloat32;
  // Algorithms that advance a per-tensor scalar state in the launch (ESGD-M):
  double* scalar_state[3] = {nullptr, nullptr, nullptr};  // [ntensors] each: old values in, new values out
  float* steps_out = nullptr;                 // [ntensors] where the new step counts go (may alias steps)
  int32_t* tickets = nullptr;                 // CUDA: [ntensors] per-tensor counters, zero between launches
  int hvp_step = 0;                           // ESGD-M: this step has Hessian-vector products
};

// Defaults of the per-algorithm functor interface (Adam, SGD): the scalars
// come from the row and the (already advanced) step; every state in the mask
// is read and written; no scalar state is advanced by the launch.
struct OpDefaults {
  static constexpr int kReadOnlyMask = 0;
  // Mask bit above the state bits: the gradient (and HVP) are divided by
  // grad_scale.  Without it the division by 1 (an exact identity) is skipped:
  // on a CPU a division is the costliest instruction of an update.
  static constexpr int kGradScaled = 1 << 3;
  static constexpr bool kAdvancesScalars = false;
  FASTMUP_HD static FASTMUP_INLINE void store_advanced(const MultiTensorArgs&, int64_t) {}
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
