// ESGD-M: the functor of esgd_math.h in the multi-tensor kernel, for every
// (param, grad, state) dtype combination of fp32 / bf16 / fp16.  The
// per-tensor scalar state advances in the same launch (the last-block
// write-back of multi_tensor.cuh's advance_scalars).
#include "cuda_api.h"
#include "esgd_math.h"
#include "multi_tensor.cuh"

namespace fastmup {
namespace cuda {

void esgd(const MultiTensorArgs& a, int device, uintptr_t stream) { launch<EsgdOp>(a, device, stream); }

}  // namespace cuda
}  // namespace fastmup
