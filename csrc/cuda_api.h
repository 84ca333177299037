// Host-side entry points of the CUDA backend, callable from code built by a
// plain C++ compiler (cuda_bindings.cpp): no CUDA types in the signatures.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastmup {
namespace cuda {

// Elements per entry of the block map the kernels expect.
int64_t block_size();

// One launch over the whole batch on `stream` (a cudaStream_t as an integer,
// e.g. torch.cuda.current_stream().cuda_stream) of `device`.  Asynchronous:
// nothing here synchronises with the host.
void adam(const MultiTensorArgs& a, int device, uintptr_t stream);
void sgd(const MultiTensorArgs& a, int device, uintptr_t stream);
// ESGD-M: also reads/writes a.scalar_state, a.steps_out and a.tickets (see esgd_math.h).
void esgd(const MultiTensorArgs& a, int device, uintptr_t stream);

}  // namespace cuda
}  // namespace fastmup
