// ESGD-M on the host: the functor of esgd_math.h over the block map; the
// per-tensor scalar state advances after the parallel pass (multi_tensor_host.h).
#include "../esgd_math.h"
#include "multi_tensor_host.h"

namespace fastmup {
namespace host {

void esgd(const MultiTensorArgs& a, int nthreads) { run<EsgdOp>(a, nthreads); }

}  // namespace host
}  // namespace fastmup
