// SGD (momentum, Nesterov) on the host: the functor of sgd_math.h over the block map.
#include "../sgd_math.h"
#include "multi_tensor_host.h"

namespace fastmup {
namespace host {

void sgd(const MultiTensorArgs& a, int nthreads) { run<SgdOp>(a, nthreads); }

}  // namespace host
}  // namespace fastmup
