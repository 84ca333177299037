// Host entry point of the gradient norm (csrc/grad_norm.h).
#pragma once

#include "../grad_norm.h"

namespace fastmup {
namespace host {

void grad_norm(const GradNormArgs& a, int nthreads);

}  // namespace host
}  // namespace fastmup
