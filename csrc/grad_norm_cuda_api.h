// Host-side entry point of the CUDA gradient norm, callable from code built
// by a plain C++ compiler (cuda_bindings.cpp).
#pragma once

#include <cstdint>

#include "grad_norm.h"

namespace fastmup {
namespace cuda {

// Elements per block-map entry the gradient-norm kernel expects.
int64_t grad_norm_block_size();

// One launch on `stream` of `device`; asynchronous, capturable in a CUDA graph.
void grad_norm(const GradNormArgs& a, int device, uintptr_t stream);

}  // namespace cuda
}  // namespace fastmup
