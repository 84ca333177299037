// The gradient norm of clipping on CUDA: one thread block per block-map
// entry.  Each block reduces its entry (float64 per thread, then a fixed
// tree in shared memory) and stores the partial; the last block of a tensor
// (a ticket per tensor) combines that tensor's partials in entry order; the
// last tensor (one more ticket) combines the tensor sums in tensor order and,
// on the final launch, writes the norm and the clip coefficient.  The
// thread-to-element mapping and the trees are fixed, so the result is the
// same bits on every run; nothing is read on the host.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "grad_norm.h"
#include "grad_norm_cuda_api.h"

namespace fastmup {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;
constexpr int64_t kNormBlock = 8192;

template <class T>
__device__ FASTMUP_INLINE const T* grad_ptr(const int64_t* table, int64_t t, int64_t start) {
  if (table[t] == 0) return nullptr;
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(table[t])) + start;
}

// The block-wide combination of one value per thread, in a fixed tree; the
// result is valid in thread 0.
template <int NORM>
__device__ FASTMUP_INLINE double block_combine(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int width = kNormThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] = norm_combine<NORM>(shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

// values[lo, hi) combined with the threads striding over them, then the tree.
template <int NORM>
__device__ FASTMUP_INLINE double combine_range(const double* values, int64_t lo, int64_t hi, double* shared,
                                               const int32_t* owners = nullptr) {
  double v = 0.0;
  for (int64_t k = lo + threadIdx.x; k < hi; k += kNormThreads) {
    // with `owners` (the entry table), only tensors that own an entry count
    if (owners == nullptr || owners[k + 1] > owners[k]) v = norm_combine<NORM>(v, *(volatile const double*)(values + k));
  }
  return block_combine<NORM>(v, shared);
}

template <int NORM, class G>
__global__ void __launch_bounds__(kNormThreads) grad_norm_kernel(const GradNormArgs a) {
  __shared__ double shared[kNormThreads];
  __shared__ int last;
  const int64_t b = blockIdx.x;
  const int64_t t = a.tensor_of_block[b];
  const int64_t start = a.start_of_block[b];
  const int64_t n = min(a.block, a.numels[t] - start);
  double v = 0.0;
  if (n > 0) {
    const G* g = grad_ptr<G>(a.grad_ptrs, t, start);
    for (int64_t i = threadIdx.x; i < n; i += kNormThreads) v = norm_combine<NORM>(v, norm_term<NORM>(to_float(g[i])));
  }
  v = block_combine<NORM>(v, shared);
  if (threadIdx.x == 0) {
    a.partials[b] = v;
    __threadfence();  // the partial is visible before the ticket that counts it
    const int32_t count = a.first_entry[t + 1] - a.first_entry[t];
    last = atomicAdd(a.tickets + t, 1) == count - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const double s = combine_range<NORM>(a.partials, a.first_entry[t], a.first_entry[t + 1], shared);
  if (threadIdx.x == 0) {
    a.sums[t] = s;
    if (a.norms != nullptr) a.norms[a.norms_index[t]] = norm_root<NORM>(s);
    a.tickets[t] = 0;
    __threadfence();
    last = atomicAdd(a.counter, 1) == a.counted - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double total = combine_range<NORM>(a.sums, 0, a.ntensors, shared, a.first_entry);
  if (threadIdx.x == 0) {
    if (a.has_acc) total = norm_combine<NORM>(*a.acc, total);
    *a.acc = total;
    if (a.result != nullptr) {
      const float norm = norm_root<NORM>(total);
      a.result[0] = norm;
      a.result[1] = clip_coefficient(norm, a.max_norm);
    }
    *a.counter = 0;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastmup CUDA grad_norm: ") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

int64_t grad_norm_block_size() { return kNormBlock; }

void grad_norm(const GradNormArgs& a, int device, uintptr_t stream) {
  if (a.nblocks <= 0) return;
  if (a.block > kNormBlock * 4096 || a.nblocks > (int64_t(1) << 31) - 1)
    throw std::invalid_argument("fastmup CUDA grad_norm: too many or too large block-map entries");
  if (a.tickets == nullptr || a.counter == nullptr || a.acc == nullptr || a.partials == nullptr || a.sums == nullptr)
    throw std::invalid_argument("fastmup CUDA grad_norm: a required table address is 0");
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_norm(a.norm, [&](auto norm) {
    dispatch_dtype(a.grad_dtype, "grad", [&](auto g) {
      grad_norm_kernel<decltype(norm)::value, decltype(g)>
          <<<static_cast<unsigned>(a.nblocks), kNormThreads, 0, s>>>(a);
    });
  });
  const cudaError_t err = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  check(err, "kernel launch");
}

}  // namespace cuda
}  // namespace fastmup
