// Adam / AdamW on the host: the functor of adam_math.h over the block map.
#include "../adam_math.h"
#include "multi_tensor_host.h"

namespace fastmup {
namespace host {

void adam(const MultiTensorArgs& a, int nthreads) { run<AdamOp>(a, nthreads); }

}  // namespace host
}  // namespace fastmup
