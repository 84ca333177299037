// The host (cpu backend) multi-tensor driver: the same per-element functors
// as the CUDA kernels, run over the block map of a TensorBatch by a pool of
// threads (OpenMP when the compiler has it, else std::thread) taking
// contiguous runs of entries, one pass over memory with a contiguous,
// vectorisable inner loop.  The loops
// (kernels.inc) are compiled for the baseline ISA and, on x86-64, for AVX2,
// picked at run time: portable flags, no -march=native.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "../common.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

// Not `omp simd`: GCC lowers it before inlining, turning the functor's
// by-reference locals into "simd arrays" that then block vectorisation.
// The build passes -fno-trapping-math -fno-math-errno, which lets the
// compiler if-convert the per-tensor flag selects and vectorise sqrtf without
// changing any result.
#if defined(__clang__)
#define FASTMUP_SIMD _Pragma("clang loop vectorize(enable)")
#elif defined(__GNUC__)
#define FASTMUP_SIMD _Pragma("GCC ivdep")
#else
#define FASTMUP_SIMD
#endif

namespace fastmup {
namespace host {

// Elements per block-map entry, at most (the plan halves it for small
// batches, fastmup.ext.host_block, so that the last runs of parallel_runs
// are short): the unit the threads share the work in, in contiguous runs
// of entries that keep the hardware prefetchers streaming.
constexpr int64_t kBlock = int64_t(1) << 18;

// ---------------------------------------------------------------------------
// The hot loops, in two instruction-set variants chosen at run time.
// ---------------------------------------------------------------------------
namespace generic {
#include "kernels.inc"
}  // namespace generic

#if !defined(FASTMUP_NO_AVX2) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMUP_HAVE_AVX2 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace avx2 {
#include "kernels.inc"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
#define FASTMUP_HAVE_AVX2 0
#endif

// Which variant runs: "avx2" when the CPU has it (and it was built), else
// "generic"; FASTMUP_HOST_ISA=generic in the environment, or set_isa(),
// forces the baseline.
enum class Isa : int { kAuto = 0, kGeneric = 1, kAvx2 = 2 };
Isa& isa_override();
bool use_avx2();
const char* isa_name();

template <class T>
inline T* tensor_ptr(const int64_t* table, int64_t t, int64_t start) {
  if (table == nullptr || table[t] == 0) return nullptr;
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[t])) + start;
}

// A run of block-map entries [begin, end): the per-tensor scalars are
// computed when the tensor changes (a tensor's entries are contiguous in the
// map), not for every entry.
template <class K, class Op, class P, class G, class S>
void update_run(const MultiTensorArgs& a, int64_t begin, int64_t end, const Unscale& unscale) {
  int64_t t = -1;
  typename Op::Scalars s;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t tb = a.tensor_of_block[b];
    const int64_t start = a.start_of_block[b];
    const int64_t n = std::min(a.block, a.numels[tb] - start);
    if (n <= 0) continue;
    if (tb != t) {
      t = tb;
      s = Op::prepare(a, t, unscale);
    }
    P* p = tensor_ptr<P>(a.param_ptrs, t, start);
    const G* g = tensor_ptr<const G>(a.grad_ptrs, t, start);
    S* s0 = tensor_ptr<S>(a.state_ptrs[0], t, start);
    S* s1 = tensor_ptr<S>(a.state_ptrs[1], t, start);
    Slot2<Op, G, S>* s2 = tensor_ptr<Slot2<Op, G, S>>(a.state_ptrs[2], t, start);
    dispatch_variant<Op>(s, unscale, [&](auto mask) { K::template update_range<Op, decltype(mask)::value>(s, p, g, s0, s1, s2, n); });
  }
}

// Run f(begin, end) over [0, n) in contiguous runs on up to nthreads
// threads, guided: each grab takes 1/(2 nthreads) of what is left, so runs
// start long and shrink toward the end.  Long runs keep each thread
// streaming through consecutive memory (a thread that took every other
// entry, as one-entry dynamic scheduling does, restarts the hardware
// prefetchers at each of them: measured 7-17% slower on GPT-2-mini and
// ResNet-50-quarter); the short last runs keep the threads finishing together.
template <class F>
void parallel_runs(int64_t n, int nthreads, const F& f) {
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n)));
  if (nthreads == 1) {
    if (n > 0) f(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    int64_t begin = next.load(std::memory_order_relaxed);
    for (;;) {
      if (begin >= n) return;
      const int64_t chunk = std::max<int64_t>(1, (n - begin) / (2 * nthreads));
      if (next.compare_exchange_weak(begin, begin + chunk, std::memory_order_relaxed)) {
        f(begin, std::min(n, begin + chunk));
        begin = next.load(std::memory_order_relaxed);
      }
    }
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(nthreads)
  worker();
#else
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  for (int i = 1; i < nthreads; ++i) threads.emplace_back(worker);
  worker();
  for (auto& th : threads) th.join();
#endif
}

template <class Op, class P, class G, class S>
void run_typed(const MultiTensorArgs& a, int nthreads) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP: inf/NaN grads, skip the step
  const Unscale unscale = make_unscale(a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
#if FASTMUP_HAVE_AVX2
  if (use_avx2()) {
    parallel_runs(a.nblocks, nthreads, [&](int64_t b, int64_t e) { update_run<avx2::Kernels, Op, P, G, S>(a, b, e, unscale); });
  } else
#endif
  {
    parallel_runs(a.nblocks, nthreads, [&](int64_t b, int64_t e) { update_run<generic::Kernels, Op, P, G, S>(a, b, e, unscale); });
  }
  // The scalar-state advance (ESGD-M): every chunk has read the old values,
  // so the new ones are stored once per tensor, empty tensors included.
  if (Op::kAdvancesScalars)
    for (int64_t t = 0; t < a.ntensors; ++t) Op::store_advanced(a, t);
}

template <class Op>
void run(const MultiTensorArgs& a, int nthreads) {
  check_columns<Op>(a);
  if (a.nblocks <= 0 && !Op::kAdvancesScalars) return;
  if (Op::kAdvancesScalars && (a.scalar_state[0] == nullptr || a.scalar_state[1] == nullptr || a.scalar_state[2] == nullptr || a.steps_out == nullptr))
    throw std::invalid_argument("fastmup: this algorithm needs its scalar state and step tables");
  dispatch_dtypes(a, [&](auto p, auto g, auto s) { run_typed<Op, decltype(p), decltype(g), decltype(s)>(a, nthreads); });
}

void adam(const MultiTensorArgs& a, int nthreads);
void sgd(const MultiTensorArgs& a, int nthreads);
void esgd(const MultiTensorArgs& a, int nthreads);

}  // namespace host
}  // namespace fastmup
