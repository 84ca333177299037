// The SGD (momentum, dampening, Nesterov) update of one element, shared by
// the CUDA kernels and the host (cpu) backend.  Mirrors
// fastmup.optim.sgd._single_tensor_sgd op for op (fp32 math, one rounding per
// stored value), including torch's first momentum step: step == 1 seeds the
// buffer with the gradient.
#pragma once

#include "common.h"

namespace fastmup {

struct SgdOp : RowStepOp<SgdOp> {
  // Column order of TensorBatch.rows: fastmup.optim.sgd.SPEC.columns
  // (kColumnNames is checked against it in CI).
  enum Col { kLr = 0, kWeightDecay, kMomentum, kDampening, kNesterov, kMaximize, kNumCols };
  static constexpr const char* kColumnNames[kNumCols] = {"lr", "weight_decay", "momentum", "dampening", "nesterov", "maximize"};
  // State buffers, in the order the launcher passes them: SPEC.buffers.
  enum State { kMomentumBuffer = 0 };
  static constexpr int kNumStates = 1;
  static constexpr const char* kStateNames[kNumStates] = {"momentum_buffer"};
  // The two variants every backend specialises on (bit k: state k in use).
  static constexpr int kMaskBase = 0b0;  // momentum == 0: no buffer
  static constexpr int kMaskFull = 0b1;  // momentum != 0

  struct Scalars {
    GradScaling grad;    // +-1/grad_scale, sign: maximize
    float wd;
    float momentum;
    float one_minus_dampening;
    float neg_lr;
    bool has_wd;
    bool nesterov;
    bool first;           // step == 1: the buffer is seeded with the gradient
    bool has_momentum;
  };

  using RowStepOp<SgdOp>::prepare;  // from the launch description: the row and the step count
  FASTMUP_HD static Scalars prepare(const double* row, float step, const Unscale& unscale) {
    Scalars s;
    s.grad = GradScaling::of(unscale, row[kMaximize] != 0.0);
    s.wd = static_cast<float>(row[kWeightDecay]);
    s.has_wd = row[kWeightDecay] != 0.0;
    s.momentum = static_cast<float>(row[kMomentum]);
    s.has_momentum = row[kMomentum] != 0.0;
    s.one_minus_dampening = static_cast<float>(1.0 - row[kDampening]);
    s.neg_lr = static_cast<float>(-row[kLr]);
    s.nesterov = row[kNesterov] != 0.0;
    s.first = step == 1.0f;
    return s;
  }

  FASTMUP_HD static int mask(const Scalars& s) { return s.has_momentum ? kMaskFull : kMaskBase; }

  template <int MASK>
  FASTMUP_HD static FASTMUP_INLINE void apply(const Scalars& s, float& p, float g, float* st) {
    g = s.grad.apply<MASK>(g);                       // +-grad / grad_scale
    g = s.has_wd ? g + s.wd * p : g;                 // grad.add(param, alpha=wd)
    if (MASK & (1 << kMomentumBuffer)) {
      const float decayed = st[kMomentumBuffer] * s.momentum;          // buf.mul_(momentum)
      const float b = s.first ? g : decayed + s.one_minus_dampening * g;  //   .add_(grad, alpha=1-dampening)
      st[kMomentumBuffer] = b;
      g = s.nesterov ? g + s.momentum * b : b;       // grad.add(buf, alpha=momentum) or buf
    }
    p = p + s.neg_lr * g;                            // param.add_(grad, alpha=-lr)
  }
};

}  // namespace fastmup
