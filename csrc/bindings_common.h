// pybind11 glue shared by the host and CUDA modules: a launch description
// arrives from Python as plain integers (addresses from data_ptr(), sizes,
// dtype codes), so the modules build without PyTorch's C++ headers or ABI.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace fastmup {

template <class T>
inline T* address(uint64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

// Builds the launch description; every table address must be non-zero
// except the optional ones (state rows, grad_scale, found_inf).
inline MultiTensorArgs make_args(int64_t ntensors, int64_t nblocks, int64_t block, uint64_t tensor_of_block,
                                 uint64_t start_of_block, uint64_t numels, uint64_t param_ptrs, uint64_t grad_ptrs,
                                 const std::vector<uint64_t>& state_ptrs, uint64_t rows, int64_t ncols, uint64_t steps,
                                 uint64_t grad_scale, uint64_t found_inf, int param_dtype, int grad_dtype,
                                 int state_dtype, uint64_t grad_clip = 0) {
  if (ntensors < 0 || nblocks < 0 || block <= 0) throw std::invalid_argument("fastmup: bad batch sizes");
  if (state_ptrs.size() > static_cast<size_t>(kMaxStates))
    throw std::invalid_argument("fastmup: at most " + std::to_string(kMaxStates) + " state buffers");
  if (nblocks > 0 && (!tensor_of_block || !start_of_block || !numels || !param_ptrs || !grad_ptrs || !rows || !steps))
    throw std::invalid_argument("fastmup: a required table address is 0");
  MultiTensorArgs a;
  a.ntensors = ntensors;
  a.nblocks = nblocks;
  a.block = block;
  a.tensor_of_block = address<const int32_t>(tensor_of_block);
  a.start_of_block = address<const int64_t>(start_of_block);
  a.numels = address<const int64_t>(numels);
  a.param_ptrs = address<const int64_t>(param_ptrs);
  a.grad_ptrs = address<const int64_t>(grad_ptrs);
  for (size_t k = 0; k < state_ptrs.size(); ++k) a.state_ptrs[k] = address<const int64_t>(state_ptrs[k]);
  a.rows = address<const double>(rows);
  a.ncols = ncols;
  a.steps = address<const float>(steps);
  a.grad_scale = address<const float>(grad_scale);
  a.found_inf = address<const float>(found_inf);
  a.grad_clip = address<const float>(grad_clip);
  a.param_dtype = param_dtype;
  a.grad_dtype = grad_dtype;
  a.state_dtype = state_dtype;
  return a;
}

// A functor's layout, as Python reads it: its columns and its state slots,
// by name (tests compare them with the algorithm's AlgorithmSpec).
template <class Op>
inline pybind11::dict layout_of() {
  pybind11::list columns, states;
  for (const char* c : Op::kColumnNames) columns.append(c);
  for (const char* s : Op::kStateNames) states.append(s);
  pybind11::dict d;
  d["columns"] = columns;
  d["states"] = states;
  return d;
}

#define FASTMUP_ARGS_SIGNATURE                                                                                 \
  int64_t ntensors, int64_t nblocks, int64_t block, uint64_t tensor_of_block, uint64_t start_of_block,         \
      uint64_t numels, uint64_t param_ptrs, uint64_t grad_ptrs, const std::vector<uint64_t>&state_ptrs,         \
      uint64_t rows, int64_t ncols, uint64_t steps, uint64_t grad_scale, uint64_t found_inf, int param_dtype, \
      int grad_dtype, int state_dtype, uint64_t grad_clip

#define FASTMUP_ARGS_FORWARD                                                                                  \
  ntensors, nblocks, block, tensor_of_block, start_of_block, numels, param_ptrs, grad_ptrs, state_ptrs, rows, \
      ncols, steps, grad_scale, found_inf, param_dtype, grad_dtype, state_dtype, grad_clip

#define FASTMUP_ARGS_NAMES                                                                                    \
  pybind11::arg("ntensors"), pybind11::arg("nblocks"), pybind11::arg("block"), pybind11::arg("tensor_of_block"), \
      pybind11::arg("start_of_block"), pybind11::arg("numels"), pybind11::arg("param_ptrs"),                  \
      pybind11::arg("grad_ptrs"), pybind11::arg("state_ptrs"), pybind11::arg("rows"), pybind11::arg("ncols"),   \
      pybind11::arg("steps"), pybind11::arg("grad_scale"), pybind11::arg("found_inf"),                        \
      pybind11::arg("param_dtype"), pybind11::arg("grad_dtype"), pybind11::arg("state_dtype"),                  \
      pybind11::arg("grad_clip") = 0

}  // namespace fastmup
