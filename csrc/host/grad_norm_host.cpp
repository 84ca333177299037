// The gradient norm on host threads: entries in parallel (each writes its
// own partial), then the per-tensor and total sums in order on the calling
// thread (a few thousand additions at most).
#include "../grad_norm.h"
#include "grad_norm_host.h"
#include "multi_tensor_host.h"

namespace fastmup {
namespace host {

namespace {

// The per-entry loop in the build's baseline ISA and, on x86-64, in AVX2
// (four float64 lanes per instruction instead of two: the loop is then bound
// by memory, not by the conversions to float64), picked at run time like the
// update loops (multi_tensor_host.h).
#define FASTMUP_ISA_LOOPS "grad_norm_kernels.inc"
#include "isa_variants.inc"

template <int NORM, class G>
double entry_partial(const G* g, int64_t n) {
#if FASTMUP_HAVE_AVX2
  if (use_avx2()) return avx2::entry_partial<NORM>(g, n);
#endif
  return generic::entry_partial<NORM>(g, n);
}

template <int NORM, class G>
void run_typed(const GradNormArgs& a, int nthreads) {
  parallel_entries(a.nblocks, nthreads, [&] {
    return [&](int64_t b) {
      const int64_t t = a.tensor_of_block[b];
      const int64_t start = a.start_of_block[b];
      const int64_t n = std::min(a.block, a.numels[t] - start);
      const G* g = n > 0 ? tensor_ptr<const G>(a.grad_ptrs, t, start) : nullptr;
      a.partials[b] = g != nullptr ? entry_partial<NORM>(g, n) : 0.0;
    };
  });
  double total = 0.0;
  for (int64_t t = 0; t < a.ntensors; ++t) {
    const int32_t lo = a.first_entry[t], hi = a.first_entry[t + 1];
    if (hi <= lo) continue;  // no entry (empty): adds nothing
    double s = a.partials[lo];
    for (int32_t b = lo + 1; b < hi; ++b) s = norm_combine<NORM>(s, a.partials[b]);
    a.sums[t] = s;
    if (a.norms != nullptr) a.norms[a.norms_index[t]] = norm_root<NORM>(s);
    total = norm_combine<NORM>(total, s);
  }
  if (a.has_acc) total = norm_combine<NORM>(*a.acc, total);
  *a.acc = total;
  if (a.result != nullptr) {
    const float norm = norm_root<NORM>(total);
    a.result[0] = norm;
    a.result[1] = clip_coefficient(norm, a.max_norm);
  }
}

}  // namespace

void grad_norm(const GradNormArgs& a, int nthreads) {
  if (a.acc == nullptr || (a.nblocks > 0 && (a.partials == nullptr || a.sums == nullptr || a.first_entry == nullptr)))
    throw std::invalid_argument("fastmup grad_norm: a required table address is 0");
  dispatch_norm(a.norm, [&](auto norm) {
    dispatch_dtype(a.grad_dtype, "grad", [&](auto g) { run_typed<decltype(norm)::value, decltype(g)>(a, nthreads); });
  });
}

}  // namespace host
}  // namespace fastmup
