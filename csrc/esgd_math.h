// The ESGD-M update of one element and the per-tensor scalar-state advance,
// shared by the CUDA kernels and the host (cpu) backend.  Mirrors
// fastmup.optim.esgd (tensor_scalars + _single_tensor_esgd) op for op: the
// per-tensor scalars in double exactly as tensor_scalars computes them in
// Python, each update factor rounded once to fp32; per element fp32 math with
// one rounding per torch op of the reference, the HVP-step d-update fused into
// the same pass.
//
// State slots (MultiTensorArgs::state_ptrs): 0: exp_avg (m), 1: exp_avg_d (d),
// both in the state dtype; 2: the HVP of this step, read only, in the
// gradient's dtype (Slot2 in common.h), only on HVP steps.  A step without
// HVPs reads d and does not store it.
// Scalar state (MultiTensorArgs::scalar_state: three double [ntensors] columns,
// bc1 = beta1^t, bc2 = beta2^k, cum = lr_warmup cumprod) and steps (float):
// every chunk of a tensor reads the OLD values (prepare); the new values are
// stored once per tensor after every chunk of it has read them (advance):
//   * host: after the parallel pass, one loop over the tensors;
//   * CUDA: in the same launch, by the block that draws the last ticket of the
//     tensor (per-tensor int32 counter, reset to 0 by that block), as in
//     kernels/esgd.py.  No extra launch, no host sync.
#pragma once

#include "common.h"

namespace fastmup {

struct EsgdOp : OpDefaults {
  // Column order of TensorBatch.rows: fastmup.optim.esgd.SPEC.columns
  // (kColumnNames is checked against it in CI).
  enum Col { kLr = 0, kWeightDecay, kBeta1, kBeta2, kV, kLrWarmup, kEps, kVariant, kNumCols };
  static constexpr const char* kColumnNames[kNumCols] = {"lr", "weight_decay", "beta1", "beta2", "v", "lr_warmup", "eps", "variant"};
  // State slots: SPEC.buffers, then SPEC.inputs (the step's HVP, read only).
  enum State { kExpAvg = 0, kExpAvgD = 1, kHvp = 2 };
  static constexpr int kNumStates = 3;
  static constexpr const char* kStateNames[kNumStates] = {"exp_avg", "exp_avg_d", "hvp"};
  static constexpr int kMaskBase = 0b011;  // no HVP this step: d is read, not written
  static constexpr int kMaskFull = 0b111;  // HVP step: the HVP is read, d updated
  static constexpr int kReadOnlyMask = 0b100;  // the HVP slot is never stored
  static constexpr bool kAdvancesScalars = true;

  struct Scalars {
    GradScaling grad;  // 1/grad_scale (no sign: ESGD-M has no maximize)
    Lerp lerp_m;   // exp_avg.lerp_(grad, 1 - beta1)
    float beta2;
    float one_minus_beta2;
    Divisor bc2_sqrt;  // / sqrt(1 - bc2) (ema), / 1 (max)
    float eps;
    Lerp lerp_q;   // torch.lerp(exp_avg, grad, 1 - v)
    float decay;   // 1 - wd * step_size
    float coef;    // -step_size / (1 - bc1 * v)
    bool is_max;
    bool started;  // the tensor has seen an HVP (bc2 != 1): otherwise p is left alone
    bool hvp;
  };

  // The new scalar state of one tensor (fastmup.optim.esgd.tensor_scalars).
  struct Advanced {
    double bc1, bc2, cum;
    double step_size;
    double v;
    bool is_max;
  };

  FASTMUP_HD static FASTMUP_INLINE Advanced advance(const double* row, double bc1, double bc2, double cum, bool hvp_step) {
    Advanced r;
    r.is_max = row[kVariant] != 0.0;
    const double beta1 = row[kBeta1];
    r.v = r.is_max ? beta1 : row[kV];
    r.bc1 = bc1 * beta1;
    r.bc2 = hvp_step ? bc2 * row[kBeta2] : bc2;
    r.cum = (hvp_step || !r.is_max) ? cum * row[kLrWarmup] : cum;
    r.step_size = row[kLr] * (1.0 - r.cum);
    return r;
  }

  // Per-tensor factors from one row and the tensor's OLD scalar state.
  FASTMUP_HD static Scalars prepare(const double* row, double bc1, double bc2, double cum, bool hvp_step,
                                    const Unscale& unscale) {
    const Advanced a = advance(row, bc1, bc2, cum, hvp_step);
    Scalars s;
    s.grad = GradScaling::of(unscale, false);
    s.is_max = a.is_max;
    s.hvp = hvp_step;
    s.started = a.bc2 != 1.0;
    s.lerp_m = Lerp::of(static_cast<float>(1.0 - row[kBeta1]));
    s.beta2 = static_cast<float>(row[kBeta2]);
    s.one_minus_beta2 = static_cast<float>(1.0 - row[kBeta2]);
    s.bc2_sqrt = Divisor::of(a.is_max ? 1.0f : static_cast<float>(sqrt(1.0 - a.bc2)));
    s.eps = static_cast<float>(row[kEps]);
    s.lerp_q = Lerp::of(static_cast<float>(1.0 - a.v));
    s.decay = static_cast<float>(1.0 - row[kWeightDecay] * a.step_size);
    s.coef = static_cast<float>(-(a.step_size / (1.0 - a.bc1 * a.v)));
    return s;
  }

  // The launch description's view: scalar_state = {bc1, bc2, cum} columns.
  FASTMUP_HD static FASTMUP_INLINE Scalars prepare(const MultiTensorArgs& a, int64_t t, const Unscale& unscale) {
    return prepare(a.rows + t * a.ncols, a.scalar_state[0][t], a.scalar_state[1][t], a.scalar_state[2][t],
                   a.hvp_step != 0, unscale);
  }

  // Store tensor t's new scalar state (once per tensor, after every chunk of
  // it has called prepare).
  FASTMUP_HD static FASTMUP_INLINE void store_advanced(const MultiTensorArgs& a, int64_t t) {
    double* const* ss = a.scalar_state;
    const Advanced r = advance(a.rows + t * a.ncols, ss[0][t], ss[1][t], ss[2][t], a.hvp_step != 0);
    ss[0][t] = r.bc1;
    ss[1][t] = r.bc2;
    ss[2][t] = r.cum;
    a.steps_out[t] = a.steps[t] + 1.0f;
  }

  FASTMUP_HD static int mask(const Scalars& s) { return s.hvp ? kMaskFull : kMaskBase; }

  // Compile-time variant flag: the max rule of the d-update (only HVP steps
  // have one), so that an update computes its own rule, not both.
  static constexpr int kMaxRule = kFirstOpFlag;
  template <int MASK, class F>
  FASTMUP_HD static FASTMUP_INLINE void with_flags(const Scalars& s, const F& f) {
    if constexpr ((MASK & (1 << kHvp)) != 0) {
      if (s.is_max) {
        f(std::integral_constant<int, MASK | kMaxRule>{});
        return;
      }
    }
    f(std::integral_constant<int, MASK>{});
  }

  // m always; d only on HVP steps (otherwise it is read and left as it is).
  template <int MASK>
  static constexpr int stored() {
    return (MASK & (1 << kHvp)) ? 0b011 : 0b001;
  }

  template <int MASK>
  FASTMUP_HD static FASTMUP_INLINE void apply(const Scalars& s, float& p, float g, float* st) {
    g = s.grad.apply<MASK>(g);                       // grad / grad_scale
    const float m = s.lerp_m(st[kExpAvg], g);        // exp_avg.lerp_(grad, 1 - beta1)
    float d = st[kExpAvgD];
    if (MASK & (1 << kHvp)) {
      const float h = s.grad.apply<MASK>(st[kHvp]);  // hvp / grad_scale
      const float dd = d * s.beta2;             // exp_avg_d.mul_(beta2)
      const float hh = h * h;
      // max: torch.maximum(d*beta2, h*h); ema: .addcmul_(h, h, value=1 - beta2)
      d = (MASK & kMaxRule) ? max_propagate_nan(dd, hh) : dd + s.one_minus_beta2 * h * h;
    }
    const float denom = s.bc2_sqrt(sqrtf(d)) + s.eps;  // (d.sqrt() / sqrt(1 - bc2)).add_(eps)
    const float m_est = s.lerp_q(m, g);                  // torch.lerp(exp_avg, grad, 1 - v)
    const float updated = p * s.decay + s.coef * m_est / denom;  // p.mul_(decay).addcdiv_(m_est, denom, value=coef)
    p = s.started ? updated : p;
    st[kExpAvg] = m;
    st[kExpAvgD] = d;
  }
};

}  // namespace fastmup
