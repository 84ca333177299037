// The Adam / AdamW update of one element, shared by the CUDA kernels and the
// host (cpu) backend.  Mirrors fastmup.optim.adam._single_tensor_adam op for
// op: every torch op of the reference rounds to fp32, and so does each line
// here, with the per-tensor scalars computed in double exactly as the
// reference computes them in Python.
#pragma once

#include "common.h"

namespace fastmup {

struct AdamOp : RowStepOp<AdamOp> {
  // Column order of TensorBatch.rows: fastmup.optim.adam.SPEC.columns
  // (kColumnNames is checked against it in CI).
  enum Col { kLr = 0, kWeightDecay, kBeta1, kBeta2, kEps, kAmsgrad, kMaximize, kDecoupled, kNumCols };
  static constexpr const char* kColumnNames[kNumCols] = {
      "lr", "weight_decay", "beta1", "beta2", "eps", "amsgrad", "maximize", "decoupled_weight_decay"};
  // State buffers, in the order the launcher passes them: SPEC.buffers.
  enum State { kExpAvg = 0, kExpAvgSq = 1, kMaxExpAvgSq = 2 };
  static constexpr int kNumStates = 3;
  static constexpr const char* kStateNames[kNumStates] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  // Which state buffers an update touches (bit k: state k): the two
  // variants every backend specialises on (here: without / with amsgrad).
  static constexpr int kMaskBase = 0b011;
  static constexpr int kMaskFull = 0b111;

  struct Scalars {
    GradScaling grad;     // +-1/grad_scale, sign: maximize
    float decay;          // decoupled weight decay factor 1 - lr*wd, or 1 (exact identity)
    float wd;             // coupled weight decay (used when `coupled`)
    Lerp lerp_m;          // exp_avg.lerp_(grad, 1 - beta1)
    float beta2;
    float one_minus_beta2;
    Divisor bc2_sqrt;     // / sqrt(1 - beta2^t)
    float eps;
    float neg_step_size;  // -lr / (1 - beta1^t)
    bool coupled;
    bool amsgrad;
  };

  // Per-tensor scalars from one row of the table and the tensor's step count
  // (and, from RowStepOp, from the launch description).
  using RowStepOp<AdamOp>::prepare;
  FASTMUP_HD static Scalars prepare(const double* row, float step, const Unscale& unscale) {
    const double lr = row[kLr], wd = row[kWeightDecay], beta1 = row[kBeta1], beta2 = row[kBeta2];
    const double t = static_cast<double>(step);
    const bool decoupled = row[kDecoupled] != 0.0;
    Scalars s;
    s.grad = GradScaling::of(unscale, row[kMaximize] != 0.0);
    s.decay = (wd != 0.0 && decoupled) ? static_cast<float>(1.0 - lr * wd) : 1.0f;
    s.coupled = wd != 0.0 && !decoupled;
    s.wd = static_cast<float>(wd);
    s.lerp_m = Lerp::of(static_cast<float>(1.0 - beta1));
    s.beta2 = static_cast<float>(beta2);
    s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    s.bc2_sqrt = Divisor::of(static_cast<float>(sqrt(1.0 - pow(beta2, t))));
    s.eps = static_cast<float>(row[kEps]);
    s.neg_step_size = static_cast<float>(-(lr / (1.0 - pow(beta1, t))));
    s.amsgrad = row[kAmsgrad] != 0.0;
    return s;
  }

  FASTMUP_HD static int mask(const Scalars& s) { return s.amsgrad ? kMaskFull : kMaskBase; }

  // One element: p, g in fp32; st[k] holds state k (only the states in MASK
  // are read and written).
  template <int MASK>
  FASTMUP_HD static FASTMUP_INLINE void apply(const Scalars& s, float& p, float g, float* st) {
    g = s.grad.apply<MASK>(g);                        // +-grad / grad_scale
    p = p * s.decay;                                  // param.mul_(1 - lr*wd)
    g = s.coupled ? g + s.wd * p : g;                 // grad.add(param, alpha=wd)
    const float m = s.lerp_m(st[kExpAvg], g);         // exp_avg.lerp_(grad, 1 - beta1)
    float v = st[kExpAvgSq] * s.beta2;                // exp_avg_sq.mul_(beta2)
    v = v + s.one_minus_beta2 * g * g;                //   .addcmul_(grad, grad, value=1 - beta2)
    float vhat = v;
    if (MASK & (1 << kMaxExpAvgSq)) {
      vhat = max_propagate_nan(st[kMaxExpAvgSq], v);  // torch.maximum(max_sq, exp_avg_sq)
      st[kMaxExpAvgSq] = vhat;
    }
    const float denom = s.bc2_sqrt(sqrtf(vhat)) + s.eps;
    p = p + s.neg_step_size * (m / denom);            // param.addcdiv_(m, denom, value=-step_size)
    st[kExpAvg] = m;
    st[kExpAvgSq] = v;
  }
};

}  // namespace fastmup
