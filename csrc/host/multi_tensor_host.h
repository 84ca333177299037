// The host (cpu backend) multi-tensor driver: the same per-element functors
// as the CUDA kernels, run over the block map of a TensorBatch by a pool of
// threads (OpenMP when the compiler has it, else std::thread), each walking
// a contiguous share of the entries, one pass over memory with a contiguous,
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
#include "../grad_norm.h"
#include "../rounding.h"
#include "isa_target.h"

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
// batches, fastmup.ext.host_block, so that the entries left at the end are
// short): the unit the threads share the work in (parallel_entries).
constexpr int64_t kBlock = int64_t(1) << 18;

// ---------------------------------------------------------------------------
// The hot loops, in two instruction-set variants chosen at run time.
// ---------------------------------------------------------------------------
#define FASTMUP_ISA_LOOPS "kernels.inc"
#include "isa_variants.inc"

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

// The entries of one thread, one at a time: the per-tensor scalars are
// computed when the tensor changes (a thread's entries are mostly
// consecutive, and a tensor's entries are contiguous in the map).
template <class K, class Op, class P, class G, class S>
struct EntryUpdater {
  const MultiTensorArgs& a;
  const Unscale& unscale;
  int64_t t = -1;
  typename Op::Scalars s;

  void operator()(int64_t b) {
    const int64_t tb = a.tensor_of_block[b];
    const int64_t start = a.start_of_block[b];
    const int64_t n = std::min(a.block, a.numels[tb] - start);
    if (n <= 0) return;
    if (tb != t) {
      t = tb;
      s = Op::prepare(a, t, unscale);
    }
    P* p = tensor_ptr<P>(a.param_ptrs, t, start);
    const G* g = tensor_ptr<const G>(a.grad_ptrs, t, start);
    S* s0 = tensor_ptr<S>(a.state_ptrs[0], t, start);
    S* s1 = tensor_ptr<S>(a.state_ptrs[1], t, start);
    Slot2<Op, G, S>* s2 = tensor_ptr<Slot2<Op, G, S>>(a.state_ptrs[2], t, start);
    StorageRun run;
    run.mode = a.storage;
    if (run.mode == kMaster) run.aux = tensor_ptr<float>(a.storage_ptrs, t, start);
    if (run.mode == kRemainder) run.aux = tensor_ptr<int16_t>(a.storage_ptrs, t, start);
    if (run.mode == kStochastic) {
      const uint64_t e0 = static_cast<uint64_t>(start);  // entries never straddle 2^32 elements (kBlock divides it)
      run.key = RoundingKey::of(a.rounding_prefix, static_cast<uint32_t>(a.steps[t]), static_cast<uint32_t>(a.tensor_ids[t]),
                                static_cast<uint32_t>(e0 >> 32));
      run.element0 = e0;
    }
    dispatch_variant<Op>(s, unscale, [&](auto mask) { K::template update_range<Op, decltype(mask)::value>(s, p, g, s0, s1, s2, n, run, a.grad_clip); });
  }
};

// [lo, hi) of entries packed in one word, so that its owner (taking from
// the front) and a thief (taking from the back) agree with one CAS.
struct alignas(64) EntryRange {
  std::atomic<uint64_t> bounds{0};

  static uint64_t pack(int64_t lo, int64_t hi) { return (static_cast<uint64_t>(hi) << 32) | static_cast<uint64_t>(lo); }
  // The next entry from the front (back: from the back), or -1 when empty.
  int64_t take(bool back) {
    uint64_t cur = bounds.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = static_cast<int64_t>(cur & 0xffffffffu), hi = static_cast<int64_t>(cur >> 32);
      if (lo >= hi) return -1;
      const uint64_t next = back ? pack(lo, hi - 1) : pack(lo + 1, hi);
      if (bounds.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return back ? hi - 1 : lo;
    }
  }
};

// Run make_worker()(b) for every entry b in [0, n) on up to nthreads threads.
// Each thread owns one contiguous share of the entries and walks it from the
// front, so its streams run through consecutive memory (one-entry dynamic
// scheduling gave two threads every other entry, restarting the hardware
// prefetchers at each: 7-17% slower SGD steps on GPT-2-mini and
// ResNet-50-quarter); a thread done with its share takes entries one at a
// time from the back of the others' (so a thread that is descheduled, on a
// shared machine, holds up the step by at most the entry it is in).
template <class MakeWorker>
void parallel_entries(int64_t n, int nthreads, const MakeWorker& make_worker) {
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, n)));
  if (nthreads == 1) {
    auto work = make_worker();
    for (int64_t b = 0; b < n; ++b) work(b);
    return;
  }
  std::vector<EntryRange> ranges(nthreads);
  for (int i = 0; i < nthreads; ++i) ranges[i].bounds.store(EntryRange::pack(n * i / nthreads, n * (i + 1) / nthreads));
  auto run = [&](int me) {
    auto work = make_worker();
    for (int64_t b = ranges[me].take(false); b >= 0; b = ranges[me].take(false)) work(b);
    for (int k = 1; k < nthreads; ++k) {  // then help the others, nearest first
      EntryRange& other = ranges[(me + k) % nthreads];
      for (int64_t b = other.take(true); b >= 0; b = other.take(true)) work(b);
    }
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(nthreads)
  run(omp_get_thread_num() % nthreads);  // fewer threads than asked: the shares left over are taken by the others
#else
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  for (int i = 1; i < nthreads; ++i) threads.emplace_back(run, i);
  run(0);
  for (auto& th : threads) th.join();
#endif
}

template <class Op, class P, class G, class S>
void run_typed(const MultiTensorArgs& a, int nthreads) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP: inf/NaN grads, skip the step
  const Unscale unscale = make_unscale(a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
#if FASTMUP_HAVE_AVX2
  if (use_avx2()) {
    parallel_entries(a.nblocks, nthreads, [&] { return EntryUpdater<avx2::Kernels, Op, P, G, S>{a, unscale}; });
  } else
#endif
  {
    parallel_entries(a.nblocks, nthreads, [&] { return EntryUpdater<generic::Kernels, Op, P, G, S>{a, unscale}; });
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
