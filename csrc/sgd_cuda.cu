// SGD (momentum, dampening, Nesterov): the functor of sgd_math.h in the
// multi-tensor kernel, for every dtype combination of fp32 / bf16 / fp16.
#include "cuda_api.h"
#include "multi_tensor.cuh"
#include "sgd_math.h"

namespace fastmup {
namespace cuda {

void sgd(const MultiTensorArgs& a, int device, uintptr_t stream) { launch<SgdOp>(a, device, stream); }

}  // namespace cuda
}  // namespace fastmup
