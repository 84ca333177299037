// Adam / AdamW: the functor of adam_math.h in the multi-tensor kernel, for
// every (param, grad, state) dtype combination of fp32 / bf16 / fp16.
#include "adam_math.h"
#include "cuda_api.h"
#include "multi_tensor.cuh"

namespace fastmup {
namespace cuda {

int64_t block_size() { return kBlock; }

void adam(const MultiTensorArgs& a, int device, uintptr_t stream) { launch<AdamOp>(a, device, stream); }

}  // namespace cuda
}  // namespace fastmup
