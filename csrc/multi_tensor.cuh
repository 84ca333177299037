// The CUDA multi-tensor driver: ONE kernel launch per TensorBatch, whatever
// its number of tensors.
//
// * The batch's block map (TensorBatch.block_map(kBlock)) maps each entry b
//   to (tensor t, first element start); a persistent grid, sized from the
//   kernel's occupancy to fill every SM, walks the entries grid-stride.
// * Per entry the block reads row t of the device hyperparameter table and
//   the tensor's step, and computes the per-tensor scalars (double) once.
// * Element offsets are int64.  When every buffer of the tensor is 16-byte
//   aligned, each thread moves VEC consecutive elements with 16-byte
//   loads/stores (VEC = 16 / smallest element size); the tail of a tensor,
//   and tensors with a misaligned buffer, take the scalar path.
// * found_inf and grad_scale are read on the device: no host sync, and the
//   launch is capturable in a CUDA graph.
// * Math is fp32 in the functors of adam_math.h / sgd_math.h, the same code
//   the host backend runs.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace fastmup {
namespace cuda {

constexpr int kThreads = 256;
// Elements per block-map entry: 32 per thread, i.e. 4-8 vector iterations.
constexpr int64_t kBlock = 8192;

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
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(pk.elems[j]);
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

template <class T>
__device__ FASTMUP_INLINE T* tensor_ptr(const int64_t* table, int64_t t, int64_t start) {
  if (table == nullptr || table[t] == 0) return nullptr;
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[t])) + start;
}

__device__ FASTMUP_INLINE uintptr_t bits_of(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// One block-map entry: n elements of one tensor, by the whole thread block.
// Slots 0 and 1 are state (S); slot 2 is S or, when read only, an input in
// the gradient's dtype (S2 = Slot2<Op, G, S>, csrc/common.h).
template <class Op, int MASK, class P, class G, class S, class S2>
__device__ FASTMUP_INLINE void update_entry(const typename Op::Scalars& s, P* p, const G* g, S* s0, S* s1, S2* s2,
                                            int64_t n) {
  constexpr int VEC = VecWidth<P, G, S>::value;  // S2 is G or S: covered
  constexpr int kStored = MASK & ~Op::kReadOnlyMask;  // read-only inputs (ESGD's HVP) are not stored
  S* st_ptr[2] = {s0, s1};
  uintptr_t misaligned = bits_of(p) | bits_of(g);
#pragma unroll
  for (int k = 0; k < 2; ++k)
    if (MASK & (1 << k)) misaligned |= bits_of(st_ptr[k]);
  if (MASK & 4) misaligned |= bits_of(s2);
  int64_t done = 0;
  if ((misaligned & 15u) == 0) {
    const int64_t nvec = n / VEC;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t i = v * VEC;
      float pf[VEC], gf[VEC], sf[kMaxStates][VEC];
      load_pack<VEC>(p + i, pf);
      load_pack<VEC>(g + i, gf);
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
      store_pack<VEC>(p + i, pf);
#pragma unroll
      for (int k = 0; k < 2; ++k)
        if (kStored & (1 << k)) store_pack<VEC>(st_ptr[k] + i, sf[k]);
      if constexpr ((kStored & 4) != 0) store_pack<VEC>(s2 + i, sf[2]);
    }
    done = nvec * VEC;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    float pf = to_float(p[i]);
    float st[kMaxStates];
#pragma unroll
    for (int k = 0; k < 2; ++k) st[k] = (MASK & (1 << k)) ? to_float(st_ptr[k][i]) : 0.0f;
    st[2] = (MASK & 4) ? to_float(s2[i]) : 0.0f;
    Op::template apply<MASK>(s, pf, to_float(g[i]), st);
    p[i] = from_float<P>(pf);
#pragma unroll
    for (int k = 0; k < 2; ++k)
      if (kStored & (1 << k)) st_ptr[k][i] = from_float<S>(st[k]);
    if constexpr ((kStored & 4) != 0) s2[i] = from_float<S2>(st[2]);
  }
}

// The per-tensor scalar-state advance in the same launch (ESGD-M), the
// last-block write-back of kernels/esgd.py: every entry of tensor t read the
// OLD scalars in Op::prepare; after the whole block has (the __syncthreads),
// thread 0 takes a ticket; the entry drawing the last ticket of the tensor
// (entries: max(1, ceil(numel / block)), the launcher's block map gives even
// an empty tensor one entry) is the last to have read, so it alone stores the
// new values and resets the counter to 0 for the next launch.  The atomic is
// preceded by a fence so that no store can be ordered before another entry's
// loads.  found_inf set: the kernel returns before any ticket, nothing moves.
template <class Op>
__device__ FASTMUP_INLINE void advance_scalars(const MultiTensorArgs& a, int64_t t) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t numel = a.numels[t];
    const int64_t entries = numel > 0 ? (numel + a.block - 1) / a.block : 1;
    __threadfence();
    const int ticket = atomicAdd(a.tickets + t, 1);
    if (ticket == entries - 1) {
      __threadfence();
      Op::store_advanced(a, t);
      a.tickets[t] = 0;
    }
  }
  __syncthreads();  // the block's next entry may be of the same tensor: keep its reads after nothing stale
}

template <class Op, class P, class G, class S>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const MultiTensorArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // AMP: inf/NaN grads, skip the step
  const float grad_scale = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  for (int64_t b = blockIdx.x; b < a.nblocks; b += gridDim.x) {
    const int64_t t = a.tensor_of_block[b];
    const int64_t start = a.start_of_block[b];
    const int64_t n = min(a.block, a.numels[t] - start);
    const typename Op::Scalars s = Op::prepare(a, t, grad_scale);
    P* p = tensor_ptr<P>(a.param_ptrs, t, start);
    const G* g = tensor_ptr<const G>(a.grad_ptrs, t, start);
    S* s0 = tensor_ptr<S>(a.state_ptrs[0], t, start);
    S* s1 = tensor_ptr<S>(a.state_ptrs[1], t, start);
    Slot2<Op, G, S>* s2 = tensor_ptr<Slot2<Op, G, S>>(a.state_ptrs[2], t, start);
    // Always divided by grad_scale: memory bound, a GPU does not notice the
    // division, and one variant fewer keeps the build small.
    if (Op::mask(s) == Op::kMaskFull)
      update_entry<Op, Op::kMaskFull | Op::kGradScaled>(s, p, g, s0, s1, s2, n);
    else
      update_entry<Op, Op::kMaskBase | Op::kGradScaled>(s, p, g, s0, s1, s2, n);
    if (Op::kAdvancesScalars) advance_scalars<Op>(a, t);
  }
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

template <class Op, class P, class G, class S>
void launch_typed(const MultiTensorArgs& a, int device, cudaStream_t stream) {
  auto kernel = multi_tensor_kernel<Op, P, G, S>;
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

// Entry point of one algorithm: checks, device guard, dtype dispatch.
template <class Op>
void launch(const MultiTensorArgs& a, int device, uintptr_t stream) {
  check_columns<Op>(a);
  if (a.nblocks <= 0) return;
  if (Op::kAdvancesScalars && (a.scalar_state[0] == nullptr || a.scalar_state[1] == nullptr || a.scalar_state[2] == nullptr || a.steps_out == nullptr || a.tickets == nullptr))
    throw std::invalid_argument("fastmup: this algorithm needs its scalar state, step and ticket tables");
  DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtypes(a, [&](auto p, auto g, auto st) { launch_typed<Op, decltype(p), decltype(g), decltype(st)>(a, device, s); });
}

}  // namespace cuda
}  // namespace fastmup
