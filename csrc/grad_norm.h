// The gradient norm of gradient clipping (fastmup.optim.clip), written once
// for the host and CUDA drivers: per-element terms, how partial results
// combine, the root and torch's clip coefficient.
//
// For norm type p in {inf, 1, 2}: every block-map entry reduces its elements
// to a float64 partial (sum of |g|^p, max |g| for inf); a tensor's sum is its
// partials combined in entry order, the launch's total the tensor sums in
// tensor order (added to the running total of the launches before it).  The
// final launch writes norm = total^(1/p) (rounded once to float32) and the
// clip coefficient min(1, max_norm * (1 / (norm + 1e-6))) in float32, the
// operations torch's clip_grad_norm_ runs on its float32 norm.  Every order is
// fixed, so a launch gives the same bits on every run.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastmup {

// Norm type codes shared with fastmup/optim/clip.py (kernels/grad_norm.py NORM_CODES).
enum NormKind : int { kNormInf = 0, kNormL1 = 1, kNormL2 = 2 };

struct GradNormArgs {
  int64_t ntensors = 0;
  int64_t nblocks = 0;                       // entries of the block map
  int64_t block = 0;                         // elements per entry
  const int32_t* tensor_of_block = nullptr;  // [nblocks]
  const int64_t* start_of_block = nullptr;   // [nblocks]
  const int64_t* numels = nullptr;           // [ntensors] elements to read (0: none this step)
  const int64_t* grad_ptrs = nullptr;        // [ntensors] addresses
  const int32_t* first_entry = nullptr;      // [ntensors + 1]: tensor t owns entries [first[t], first[t+1])
  int64_t counted = 0;                       // tensors with at least one entry
  int grad_dtype = kFloat32;
  int norm = kNormL2;
  double* partials = nullptr;                // [nblocks]
  double* sums = nullptr;                    // [ntensors] per-tensor sums of |g|^p (max for inf)
  int32_t* tickets = nullptr;                // CUDA: [ntensors], zero between launches
  int32_t* counter = nullptr;                // CUDA: [1], zero between launches
  double* acc = nullptr;                     // [1] running total: read if has_acc, always written
  int has_acc = 0;
  float* result = nullptr;                   // [2] norm, clip coefficient; null: not the final launch
  float max_norm = 0.0f;
  float* norms = nullptr;                    // per-tensor norms, or null
  const int64_t* norms_index = nullptr;      // [ntensors] where tensor t's norm goes in `norms`
};

template <int NORM>
FASTMUP_HD FASTMUP_INLINE double norm_term(float x) {
  const double d = static_cast<double>(x);
  return NORM == kNormL2 ? d * d : fabs(d);
}

// Sum, or for inf the maximum with NaN propagating (torch's amax).
template <int NORM>
FASTMUP_HD FASTMUP_INLINE double norm_combine(double a, double b) {
  if (NORM == kNormInf) return (a != a || a > b) ? a : b;
  return a + b;
}

template <int NORM>
FASTMUP_HD FASTMUP_INLINE float norm_root(double total) {
  return static_cast<float>(NORM == kNormL2 ? sqrt(total) : total);
}

// torch: clip_coef = max_norm / (total_norm + 1e-6) (Tensor.__rtruediv__ is
// reciprocal() * other), clamped to at most 1; NaN stays NaN.
FASTMUP_HD FASTMUP_INLINE float clip_coefficient(float norm, float max_norm) {
  const float denom = norm + 1e-6f;
  const float coef = (1.0f / denom) * max_norm;
  return coef > 1.0f ? 1.0f : coef;
}

// A deferred clip coefficient where an update reads its gradient: the value
// g.mul_(coef) would have stored in place (one fp32 product rounded once to
// the gradient's storage type G), so a clipped step is bit for bit the
// in-place clip followed by the step.
template <class G>
FASTMUP_HD FASTMUP_INLINE float clip_grad(float g, float coef) {
  return to_float(from_float<G>(g * coef));
}

// Calls f(std::integral_constant<int, NORM>{}) for a norm code.
template <class F>
void dispatch_norm(int code, const F& f) {
  switch (code) {
    case kNormInf: f(std::integral_constant<int, kNormInf>{}); break;
    case kNormL1: f(std::integral_constant<int, kNormL1>{}); break;
    case kNormL2: f(std::integral_constant<int, kNormL2>{}); break;
    default: throw std::invalid_argument("fastmup grad_norm: unsupported norm code " + std::to_string(code));
  }
}

}  // namespace fastmup
