// The CUDA multi-tensor driver: ONE kernel launch per TensorBatch, whatever
// its number of tensors.
//
// * The batch's block map (TensorBatch.block_map(kBlock)) maps each entry b
//   to (tensor t, first element start); a persistent grid, sized from the
//   kernel's occupancy to fill every SM, gives each thread block one
//   contiguous run of entries (equal counts).  A tensor's entries are
//   contiguous in the map, so a block computes a tensor's per-tensor scalars
//   (double, from its row of the device hyperparameter table and its step)
//   once per run, not once per entry: two pow() per thread are more
//   instructions than a thread's share of an entry's elements.
// * Element offsets are int64.  When every buffer of the tensor is 16-byte
//   aligned, each thread moves VEC consecutive elements with 16-byte global
//   loads/stores (VEC = 16 / smallest element size), straight from and to
//   registers; the tail of a tensor, and tensors with a misaligned buffer,
//   take the scalar path (two elements per thread and iteration, four under
//   stochastic rounding; the deferred clip decided outside the loop).
// * bf16/fp16 parameters under a storage mode of fastmup.optim.precision
//   (stochastic rounding, fp32 master weights, bf16 + 16-bit remainders) run
//   kernels of their own (multi_tensor_storage_kernel), chosen once per
//   launch.
// * found_inf and grad_scale are read on the device: no host sync, and the
//   launch is capturable in a CUDA graph.  A power-of-two grad_scale (or
//   none) is undone by an exact multiply, any other by a division
//   (Unscale, common.h): bit-identical either way.
// * Math is fp32 in the functors of adam_math.h / sgd_math.h / esgd_math.h,
//   the same code the host backend runs.  The build compiles it with
//   --fmad=false (fastmup/ext/build.py), as the host build uses
//   -ffp-contract=off: every product is rounded before it is added, as in
//   the reference, so the CUDA and host backends round identically.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "grad_norm.h"
#include "rounding.h"

namespace fastmup {
struct EsgdOp;  // esgd_math.h

namespace cuda {

constexpr int kThreads = 256;
// Elements per block-map entry: 32 per thread, i.e. 4-8 vector iterations.
constexpr int64_t kBlock = 8192;
// The largest entry a launch may ask for, and the most entries: element
// offsets inside an entry and entry indices are int.
constexpr int64_t kMaxBlock = int64_t(1) << 28;
constexpr int64_t kMaxEntries = int64_t(1) << 30;

template <class A, class B, class C>
struct VecWidth {
  static constexpr int kMinSize = sizeof(A) < sizeof(B) ? (sizeof(A) < sizeof(C) ? sizeof(A) : sizeof(C))
                                                        : (sizeof(B) < sizeof(C) ? sizeof(B) : sizeof(C));
  static constexpr int value = 16 / kMinSize;
};

// N consecutive elements of T through 16-byte transactions.
template <class T, int N>
struct alignas(16) Pack {
  static_assert((N * sizeof(T)) % 16 == 0, "a pack must be a whole number of 16-byte words");
  static constexpr int kWords = static_cast<int>(N * sizeof(T) / 16);
  union {
    uint4 words[kWords];
    T elems[N];
  };
  __device__ FASTMUP_INLINE Pack() {}
};

template <int N, class T>
__device__ FASTMUP_INLINE void load_pack(const T* src, float (&out)[N]) {
  Pack<T, N> pk;
  const uint4* w = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int k = 0; k < Pack<T, N>::kWords; ++k) pk.words[k] = w[k];
  if constexpr (std::is_same<T, Bf16>::value) {
    // bf16 is the top half of an fp32: each 32-bit word holds two, and one
    // integer op apiece widens them (element 2j is the low half)
    const uint32_t* u = reinterpret_cast<const uint32_t*>(pk.words);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      out[2 * j] = bits_float(u[j] << 16);
      out[2 * j + 1] = bits_float(u[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(pk.elems[j]);
  }
}

template <int N, class T>
__device__ FASTMUP_INLINE void store_pack(T* dst, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.elems[j] = from_float<T>(in[j]);
  uint4* w = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int k = 0; k < Pack<T, N>::kWords; ++k) w[k] = pk.words[k];
}

// ---------------------------------------------------------------------------
// The parameter under its storage mode (rounding.h; fastmup.optim.precision)
// of stochastic rounding, fp32 masters or bf16 remainders, as the host driver
// loads and stores its tiles (csrc/host/kernels.inc: load_param_tile,
// store_param_tile), with the same bits: STORAGE is a compile-time choice
// made once per launch, so the default kernel (kNearest) is the plain one.
// ---------------------------------------------------------------------------
// Stochastic rounding spends its instructions on the hash (one mix per pair
// of elements, its first step once per entry) and rounds each pair in the
// cheap forms of rounding.h (stochastic_pack) with one check per pack: the
// 6-byte-per-element SGD loops have about 34 instructions per element under
// the 80% issue budget of fastmup.inspect, the plain update already 22-28 in
// the scalar loops with the loss-scale division, hence their four adjacent
// elements per thread (two pairs, one check, the loop's own work shared).
//
// What one entry's storage mode needs: the aux stream at the entry's first
// element (kMaster: fp32 masters, kRemainder: int16 remainders), or for
// stochastic rounding the RoundingKey head of the entry's first pair (the
// word of the entry's pair j is RoundingKey::word(head, j): the entry starts
// at a multiple of the block, a power of two of at most 2^17 elements, so
// its pair indices are that multiple's half ^ j with j < 2^16).
struct EntryStorage {
  void* aux = nullptr;
  uint32_t head = 0;
};

// The bf16/fp16 copy of an fp32 master: bf16 as the remainder split rounds
// it (nearest, ties away), so that both master modes store the same
// parameter; fp16 to nearest even.
template <class P>
__device__ FASTMUP_INLINE P master_copy(float x) {
  if constexpr (std::is_same<P, Bf16>::value) {
    return Bf16{round_nearest_away_bf16(x)};
  } else {
    return from_float<P>(x);
  }
}

template <class T, int N>
__device__ FASTMUP_INLINE void load_words(const T* src, Pack<T, N>& pk) {
  const uint4* w = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int k = 0; k < Pack<T, N>::kWords; ++k) pk.words[k] = w[k];
}

template <class T, int N>
__device__ FASTMUP_INLINE void store_words(T* dst, const Pack<T, N>& pk) {
  uint4* w = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int k = 0; k < Pack<T, N>::kWords; ++k) w[k] = pk.words[k];
}

// N parameters from element i of the entry, as the update starts from them:
// the parameter, its fp32 master (the parameter is not read), or the
// parameter joined with its remainder.
template <int STORAGE, int N, class P>
__device__ FASTMUP_INLINE void load_param_pack(const P* p, const EntryStorage& es, int i, float (&out)[N]) {
  if constexpr (STORAGE == kMaster) {
    load_pack<N>(static_cast<const float*>(es.aux) + i, out);
  } else if constexpr (STORAGE == kRemainder) {
    Pack<Bf16, N> pk;
    Pack<int16_t, N> rk;
    load_words(p + i, pk);
    load_words(static_cast<const int16_t*>(es.aux) + i, rk);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = decode_remainder(pk.elems[j].bits, rk.elems[j]);
  } else {
    load_pack<N>(p + i, out);
  }
}

// N updated fp32 parameters from element i, stored as the mode keeps them.
template <int STORAGE, int N, class P>
__device__ FASTMUP_INLINE void store_param_pack(P* p, const EntryStorage& es, int i, const float (&in)[N]) {
  if constexpr (STORAGE == kStochastic) {
    uint32_t words[N / 2];  // i is a multiple of N: the pack is pairs i / 2 ... of the entry
    stochastic_pack<P, N>(in, es.head, static_cast<uint32_t>(i) >> 1, words);
    Pack<P, N> pk;
#pragma unroll
    for (int k = 0; k < Pack<P, N>::kWords; ++k) pk.words[k] = make_uint4(words[4 * k], words[4 * k + 1], words[4 * k + 2], words[4 * k + 3]);
    store_words(p + i, pk);
  } else if constexpr (STORAGE == kMaster) {
    store_pack<N>(static_cast<float*>(es.aux) + i, in);
    Pack<P, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.elems[j] = master_copy<P>(in[j]);
    store_words(p + i, pk);
  } else if constexpr (STORAGE == kRemainder) {
    Pack<Bf16, N> pk;
    Pack<int16_t, N> rk;
#pragma unroll
    for (int j = 0; j < N; ++j) encode_remainder(in[j], pk.elems[j].bits, rk.elems[j]);
    store_words(p + i, pk);
    store_words(static_cast<int16_t*>(es.aux) + i, rk);
  } else {
    store_pack<N>(p + i, in);
  }
}

// One parameter (the scalar loop), loaded and stored likewise.
template <int STORAGE, class P>
__device__ FASTMUP_INLINE float load_param(const P* p, const EntryStorage& es, int i) {
  if constexpr (STORAGE == kMaster) {
    return static_cast<const float*>(es.aux)[i];
  } else if constexpr (STORAGE == kRemainder) {
    return decode_remainder(p[i].bits, static_cast<const int16_t*>(es.aux)[i]);
  } else {
    return to_float(p[i]);
  }
}

template <int STORAGE, class P>
__device__ FASTMUP_INLINE void store_param(P* p, const EntryStorage& es, int i, float x) {
  if constexpr (STORAGE == kMaster) {
    static_cast<float*>(es.aux)[i] = x;
    p[i] = master_copy<P>(x);
  } else if constexpr (STORAGE == kRemainder) {
    uint16_t b;
    encode_remainder(x, b, static_cast<int16_t*>(es.aux)[i]);
    p[i] = Bf16{b};
  } else {
    p[i] = from_float<P>(x);
  }
}

// The tensor's buffer from an address table, as a pointer into global
// memory: torch's CUDA tensors live there, and saying so lets the compiler
// use global loads and stores rather than generic ones.
template <class T>
__device__ FASTMUP_INLINE T* tensor_ptr(const int64_t* table, int64_t t, int64_t start) {
  if (table == nullptr || table[t] == 0) return nullptr;
  return static_cast<T*>(__cvta_global_to_generic(static_cast<size_t>(table[t]))) + start;
}

__device__ FASTMUP_INLINE uintptr_t bits_of(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// clip_grad (grad_norm.h) with the same rounding in fewer instructions
// for a bf16 gradient: the conversion that packs the value into the high
// half of a word whose low half is zero gives the widened value itself.
template <class G>
__device__ FASTMUP_INLINE float clip_gradient(float g, float coef) {
  if constexpr (std::is_same<G, Bf16>::value) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(0.0f, g * coef);  // .x, the low half: 0
    return __uint_as_float(*reinterpret_cast<const uint32_t*>(&h));
  } else {
    return clip_grad<G>(g, coef);
  }
}

// The scalar loop of update_entry from element `done` on: two elements per
// thread and iteration (kThreads apart), so that the loop's count and
// address arithmetic and the reciprocal of a uniform divisor are shared, the
// odd element left after it (stochastic rounding: four adjacent ones, below);
// CLIP (the deferred clip, uniform) decided outside it.
template <class Op, int MASK, int STORAGE, bool CLIP, class P, class G, class S, class S2>
__device__ FASTMUP_INLINE void scalar_loop(const typename Op::Scalars& s, P* p, const G* g, S* s0, S* s1, S2* s2,
                                           int done, int n, float coef, const EntryStorage& es) {
  constexpr int kStored = Op::template stored<MASK>();
  S* st_ptr[2] = {s0, s1};
  // element i's update, its state stored: the fp32 parameter to store
  auto update = [&](int i) {
    float pf = load_param<STORAGE>(p, es, i);
    float st[kMaxStates];
#pragma unroll
    for (int k = 0; k < 2; ++k) st[k] = (MASK & (1 << k)) ? to_float(st_ptr[k][i]) : 0.0f;
    st[2] = (MASK & 4) ? to_float(s2[i]) : 0.0f;
    const float gi = to_float(g[i]);
    Op::template apply<MASK>(s, pf, CLIP ? clip_gradient<G>(gi, coef) : gi, st);
#pragma unroll
    for (int k = 0; k < 2; ++k)
      if (kStored & (1 << k)) st_ptr[k][i] = from_float<S>(st[k]);
    if constexpr ((kStored & 4) != 0) s2[i] = from_float<S2>(st[2]);
    return pf;
  };
  if constexpr (STORAGE == kStochastic) {
    // Four adjacent elements per thread instead (done is a multiple of 4):
    // two pairs, each sharing a hash word, rounded with one check
    // (stochastic_pack); the up to three elements left at the end of the
    // entry, by one thread, as a pair and a single (the low half of a pair).
    int i = done + 4 * static_cast<int>(threadIdx.x);
#pragma unroll 1
    for (; i + 3 < n; i += 4 * kThreads) {
      float x[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = update(i + q);
      uint32_t b[2];
      stochastic_pack<P, 4>(x, es.head, static_cast<uint32_t>(i) >> 1, b);
#pragma unroll
      for (int q = 0; q < 4; ++q) p[i + q] = P{static_cast<uint16_t>(b[q / 2] >> (16 * (q % 2)))};
    }
    if (i + 1 < n) {
      const float x0 = update(i), x1 = update(i + 1);
      const uint32_t b = stochastic_pair<P>(x0, x1, RoundingKey::word(es.head, static_cast<uint32_t>(i) >> 1));
      p[i] = P{static_cast<uint16_t>(b)};
      p[i + 1] = P{static_cast<uint16_t>(b >> 16)};
      i += 2;
    }
    if (i < n) {
      const float x0 = update(i);
      p[i] = P{static_cast<uint16_t>(stochastic_pair<P>(x0, x0, RoundingKey::word(es.head, static_cast<uint32_t>(i) >> 1)))};
    }
    return;
  }
  auto one = [&](int i) { store_param<STORAGE>(p, es, i, update(i)); };
  int i = done + static_cast<int>(threadIdx.x);
#pragma unroll 1
  for (; i + kThreads < n; i += 2 * kThreads) {
    one(i);
    one(i + kThreads);
  }
  if (i < n) one(i);
}

// One block-map entry: n elements of one tensor, by the whole thread block.
// Slots 0 and 1 are state (S); slot 2 is S or, when read only, an input in
// the gradient's dtype (S2 = Slot2<Op, G, S>, csrc/common.h).
template <class Op, int MASK, int STORAGE, class P, class G, class S, class S2>
__device__ FASTMUP_INLINE void update_entry(const typename Op::Scalars& s, P* p, const G* g, S* s0, S* s1, S2* s2,
                                            int n, const float* clip, const EntryStorage& es) {
  // a deferred clip coefficient (clip_grad), read once; uniform over the block
  const bool clipped = clip != nullptr;
  const float coef = clipped ? *clip : 1.0f;
  constexpr int VEC = VecWidth<P, G, S>::value;  // S2 is G or S: covered
  constexpr int kStored = Op::template stored<MASK>();
  S* st_ptr[2] = {s0, s1};
  uintptr_t misaligned = bits_of(p) | bits_of(g);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (MASK & (1 << k)) misaligned |= bits_of(st_ptr[k]);
  if (MASK & 4) misaligned |= bits_of(s2);
  if constexpr (STORAGE == kMaster || STORAGE == kRemainder) misaligned |= bits_of(es.aux);
  int done = 0;  // n <= kMaxBlock: int offsets, one multiply-add per address
  if ((misaligned & 15u) == 0) {
    const int nvec = static_cast<int>(static_cast<unsigned>(n) / VEC);
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      const int i = v * VEC;
      float pf[VEC], gf[VEC], sf[kMaxStates][VEC];
      load_param_pack<STORAGE, VEC>(p, es, i, pf);
      load_pack<VEC>(g + i, gf);
      if (clipped) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) gf[j] = clip_grad<G>(gf[j], coef);
      }
#pragma unroll
      for (int k = 0; k < 2; ++k)
        if (MASK & (1 << k)) load_pack<VEC>(st_ptr[k] + i, sf[k]);
      if (MASK & 4) load_pack<VEC>(s2 + i, sf[2]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float st[kMaxStates];
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k) st[k] = (MASK & (1 << k)) ? sf[k][j] : 0.0f;
        Op::template apply<MASK>(s, pf[j], gf[j], st);
#pragma unroll
        for (int k = 0; k < kMaxStates; ++k)
          if (MASK & (1 << k)) sf[k][j] = st[k];
      }
      store_param_pack<STORAGE, VEC>(p, es, i, pf);
#pragma unroll
      for (int k = 0; k < 2; ++k)
        if (kStored & (1 << k)) store_pack<VEC>(st_ptr[k] + i, sf[k]);
      if constexpr ((kStored & 4) != 0) store_pack<VEC>(s2 + i, sf[2]);
    }
    done = nvec * VEC;
  }
  // The tail (under VEC elements), or every element of a tensor with a
  // misaligned buffer (rare: a view at an odd offset).
  if (clipped) {
    scalar_loop<Op, MASK, STORAGE, true>(s, p, g, s0, s1, s2, done, n, coef, es);
  } else {
    scalar_loop<Op, MASK, STORAGE, false>(s, p, g, s0, s1, s2, done, n, coef, es);
  }
}

// The per-tensor scalar-state advance in the same launch (ESGD-M), the
// last-block write-back of kernels/esgd.py: every entry of tensor t read the
// OLD scalars in Op::prepare; once the whole block has (the __syncthreads),
// thread 0 takes one ticket per entry of t in the block's run; the block
// whose tickets complete the tensor's count (entries: max(1, ceil(numel /
// block)); the launcher's block map gives even an empty tensor one entry) is
// the last to have read, so it alone stores the new values and resets the
// counter to 0 for the next launch.  A block never comes back to a tensor
// after its run of it, so nothing it reads later can be stale.  The atomic is
// preceded by a fence so that no store can be ordered before another entry's
// loads.  found_inf set: the kernel returns before any ticket, nothing moves.
template <class Op>
__device__ FASTMUP_INLINE void advance_scalars(const MultiTensorArgs& a, int64_t t, int count) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t numel = a.numels[t];
    const int64_t entries = numel > 0 ? (numel + a.block - 1) / a.block : 1;
    __threadfence();
    const int ticket = atomicAdd(a.tickets + t, count);
    if (ticket + count == entries) {
      __threadfence();
      Op::store_advanced(a, t);
      a.tickets[t] = 0;
    }
  }
}

// One entry, in the variant its scalars and the launch's unscaling ask for.
template <class Op, class P, class G, class S, int STORAGE>
__device__ FASTMUP_INLINE void update_entry_of(const MultiTensorArgs& a, const typename Op::Scalars& s,
                                               const Unscale& unscale, int64_t b, int64_t t, const RoundingKey& key) {
  const int64_t start = a.start_of_block[b];
  const int n = static_cast<int>(min(a.block, a.numels[t] - start));
  P* p = tensor_ptr<P>(a.param_ptrs, t, start);
  const G* g = tensor_ptr<const G>(a.grad_ptrs, t, start);
  S* s0 = tensor_ptr<S>(a.state_ptrs[0], t, start);
  S* s1 = tensor_ptr<S>(a.state_ptrs[1], t, start);
  Slot2<Op, G, S>* s2 = tensor_ptr<Slot2<Op, G, S>>(a.state_ptrs[2], t, start);
  EntryStorage es;
  if constexpr (STORAGE == kStochastic) es.head = key.head(static_cast<uint32_t>(start) >> 1);
  if constexpr (STORAGE == kMaster) es.aux = tensor_ptr<float>(a.storage_ptrs, t, start);
  if constexpr (STORAGE == kRemainder) es.aux = tensor_ptr<int16_t>(a.storage_ptrs, t, start);
  dispatch_variant<Op>(s, unscale, [&](auto mask) {
    update_entry<Op, decltype(mask)::value, STORAGE>(s, p, g, s0, s1, s2, n, a.grad_clip, es);
  });
}

// The persistent loop over a block's run of entries.
template <class Op, class P, class G, class S, int STORAGE>
__device__ FASTMUP_INLINE void update_entries(const MultiTensorArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP: inf/NaN grads, skip the step
  const Unscale unscale = make_unscale(a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
  // at most kMaxEntries entries (launch checks): 32-bit bounds
  const int nblocks = static_cast<int>(a.nblocks);
  const int per_block = static_cast<int>((static_cast<unsigned>(nblocks) + gridDim.x - 1) / gridDim.x);
  const int first = static_cast<int>(blockIdx.x) * per_block;
  const int last = min(nblocks, first + per_block);
  int t = -1;   // the tensor of the current run
  int run = 0;  // entries of t seen in this run
  typename Op::Scalars s;
  // stochastic rounding: the key of tensor t's elements whose index has high
  // word key_hi (entries never straddle 2^32 elements: the block divides it)
  RoundingKey key{0u};
  uint32_t key_hi = 0;
  for (int b = first; b < last; ++b) {
    const int tb = a.tensor_of_block[b];
    const bool new_tensor = tb != t;
    if (new_tensor) {
      if (Op::kAdvancesScalars && run > 0) advance_scalars<Op>(a, t, run);
      t = tb;
      run = 0;
      s = Op::prepare(a, t, unscale);
    }
    if constexpr (STORAGE == kStochastic) {
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(a.start_of_block[b]) >> 32);
      if (new_tensor || hi != key_hi) {
        key_hi = hi;
        key = RoundingKey::of(a.rounding_prefix, static_cast<uint32_t>(a.steps[t]), static_cast<uint32_t>(a.tensor_ids[t]), hi);
      }
    }
    update_entry_of<Op, P, G, S, STORAGE>(a, s, unscale, b, t, key);
    ++run;
  }
  if (Op::kAdvancesScalars && run > 0) advance_scalars<Op>(a, t, run);
}

// Parameters stored to nearest (every dtype)...  (The bounds' minimum of one
// resident block leaves ptxas the registers it asks for: with the thread
// count alone it holds some instantiations at 64 and spills their per-run
// values.)
template <class Op, class P, class G, class S>
__global__ void __launch_bounds__(kThreads, 1) multi_tensor_kernel(const MultiTensorArgs a) {
  update_entries<Op, P, G, S, kNearest>(a);
}

// ... and bf16/fp16 parameters under another storage mode (rounding.h's
// enum Storage), a kernel of its own so that the default one is unchanged.
template <class Op, class P, class G, class S, int STORAGE>
__global__ void __launch_bounds__(kThreads, 1) multi_tensor_storage_kernel(const MultiTensorArgs a) {
  update_entries<Op, P, G, S, STORAGE>(a);
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a sticky-less error so later launches start clean
    throw std::runtime_error(std::string("fastmup CUDA backend: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for the scope (the caller's stream belongs to it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Resident blocks of `kernel` on the whole device: the persistent grid size.
template <class Kernel>
int64_t resident_blocks(Kernel kernel, int device) {
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max(1, sms * std::max(1, per_sm));
}

template <class Op, class P, class G, class S, int STORAGE>
void launch_typed(const MultiTensorArgs& a, int device, cudaStream_t stream) {
  auto kernel = [] {
    if constexpr (STORAGE == kNearest) return multi_tensor_kernel<Op, P, G, S>;
    else return multi_tensor_storage_kernel<Op, P, G, S, STORAGE>;
  }();
  // Per kernel instantiation and device (occupancy differs between them);
  // a benign race: concurrent writers store the same value.
  constexpr int kMaxDevices = 64;
  static int64_t cached[kMaxDevices] = {0};
  int64_t resident = (device >= 0 && device < kMaxDevices) ? cached[device] : 0;
  if (resident <= 0) {
    resident = resident_blocks(kernel, device);
    if (device >= 0 && device < kMaxDevices) cached[device] = resident;
  }
  const int64_t grid = std::min<int64_t>(a.nblocks, resident);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
  check(cudaGetLastError(), "kernel launch");
}

// Which algorithms have the storage-mode kernels (rounding.h): those whose
// optimizers take the modes (fastmup.optim.precision; not ESGD-M).
template <class Op>
struct TakesStorageModes : std::true_type {};
template <>
struct TakesStorageModes<::fastmup::EsgdOp> : std::false_type {};

// Calls f(std::integral_constant<int, STORAGE>{}) for the launch's storage
// mode (kNearest, kStochastic, kMaster, kRemainder), as the host driver reads it: the modes apply to bf16/fp16
// parameters (fp32 ones are stored as they are), remainders to bf16 ones
// (fp16 parameters under kRemainder are stored to nearest, like the host).
// The mode kernels are built for gradients in the parameter's dtype (what
// autograd gives a parameter; fastmup.optim.backend refuses the rest).
template <class Op, class P, class G, class F>
void dispatch_storage(const MultiTensorArgs& a, const F& f) {
  using Nearest = std::integral_constant<int, kNearest>;
  if constexpr (std::is_same<P, float>::value || !TakesStorageModes<Op>::value) {
    if (!std::is_same<P, float>::value && a.storage != kNearest)
      throw std::invalid_argument("fastmup: this algorithm has no parameter storage modes (storage code " +
                                  std::to_string(a.storage) + ")");
    f(Nearest{});
  } else {
    if (a.storage == kNearest) return f(Nearest{});
    if (a.storage == kStochastic && a.tensor_ids == nullptr)
      throw std::invalid_argument("fastmup: stochastic rounding needs tensor_ids");
    // the kernels derive an entry's hash words from its first pair (EntryStorage)
    if (a.storage == kStochastic && (a.block < 2 || a.block > (int64_t(1) << 17) || (a.block & (a.block - 1)) != 0))
      throw std::invalid_argument("fastmup CUDA backend: stochastic rounding needs a power-of-two block of 2 to 2^17 elements, got " +
                                  std::to_string(a.block));
    if (a.storage < kNearest || a.storage > kRemainder)
      throw std::invalid_argument("fastmup: unknown parameter storage code " + std::to_string(a.storage));
    if ((a.storage == kMaster || a.storage == kRemainder) && a.storage_ptrs == nullptr)
      throw std::invalid_argument("fastmup: parameter storage mode " + std::to_string(a.storage) + " needs storage_ptrs");
    if constexpr (!std::is_same<G, P>::value) {
      throw std::invalid_argument("fastmup CUDA backend: parameter storage modes take gradients in the parameter's dtype");
    } else {
      switch (a.storage) {
        case kStochastic: return f(std::integral_constant<int, kStochastic>{});
        case kMaster: return f(std::integral_constant<int, kMaster>{});
        default:
          if constexpr (std::is_same<P, Bf16>::value) return f(std::integral_constant<int, kRemainder>{});
          else return f(Nearest{});
      }
    }
  }
}

// Entry point of one algorithm: checks, device guard, dtype dispatch.
template <class Op>
void launch(const MultiTensorArgs& a, int device, uintptr_t stream) {
  check_columns<Op>(a);
  if (a.nblocks <= 0) return;
  if (a.block > kMaxBlock || a.nblocks > kMaxEntries)
    throw std::invalid_argument("fastmup: a block map of " + std::to_string(a.nblocks) + " entries of " +
                                std::to_string(a.block) + " elements; at most 2^30 entries of " +
                                std::to_string(kMaxBlock));
  if (Op::kAdvancesScalars && (a.scalar_state[0] == nullptr || a.scalar_state[1] == nullptr || a.scalar_state[2] == nullptr || a.steps_out == nullptr || a.tickets == nullptr))
    throw std::invalid_argument("fastmup: this algorithm needs its scalar state, step and ticket tables");
  DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes(a, [&](auto p, auto g, auto st) {
    using P = decltype(p);
    using G = decltype(g);
    using S = decltype(st);
    dispatch_storage<Op, P, G>(a, [&](auto mode) { launch_typed<Op, P, G, S, decltype(mode)::value>(a, device, s); });
  });
}

}  // namespace cuda
}  // namespace fastmup
