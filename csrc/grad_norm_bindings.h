// pybind11 glue of the gradient norm, shared by the host and CUDA modules:
// plain integers in (addresses from data_ptr(), sizes, codes), as the
// optimizer launches take them.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "bindings_common.h"
#include "grad_norm.h"

namespace fastmup {

inline GradNormArgs make_grad_norm_args(int64_t ntensors, int64_t nblocks, int64_t block, uint64_t tensor_of_block,
                                        uint64_t start_of_block, uint64_t numels, uint64_t grad_ptrs,
                                        uint64_t first_entry, int64_t counted, int grad_dtype, int norm,
                                        uint64_t partials, uint64_t sums, uint64_t tickets, uint64_t counter,
                                        uint64_t acc, int has_acc, uint64_t result, float max_norm, uint64_t norms,
                                        uint64_t norms_index) {
  if (ntensors < 0 || nblocks < 0 || block <= 0) throw std::invalid_argument("fastmup grad_norm: bad sizes");
  if (nblocks > 0 && (!tensor_of_block || !start_of_block || !numels || !grad_ptrs || !first_entry))
    throw std::invalid_argument("fastmup grad_norm: a required table address is 0");
  if (norms && !norms_index) throw std::invalid_argument("fastmup grad_norm: per-tensor norms need their index table");
  GradNormArgs a;
  a.ntensors = ntensors;
  a.nblocks = nblocks;
  a.block = block;
  a.tensor_of_block = address<const int32_t>(tensor_of_block);
  a.start_of_block = address<const int64_t>(start_of_block);
  a.numels = address<const int64_t>(numels);
  a.grad_ptrs = address<const int64_t>(grad_ptrs);
  a.first_entry = address<const int32_t>(first_entry);
  a.counted = counted;
  a.grad_dtype = grad_dtype;
  a.norm = norm;
  a.partials = address<double>(partials);
  a.sums = address<double>(sums);
  a.tickets = address<int32_t>(tickets);
  a.counter = address<int32_t>(counter);
  a.acc = address<double>(acc);
  a.has_acc = has_acc;
  a.result = address<float>(result);
  a.max_norm = max_norm;
  a.norms = address<float>(norms);
  a.norms_index = address<const int64_t>(norms_index);
  return a;
}

#define FASTMUP_GRAD_NORM_SIGNATURE                                                                              \
  int64_t ntensors, int64_t nblocks, int64_t block, uint64_t tensor_of_block, uint64_t start_of_block,           \
      uint64_t numels, uint64_t grad_ptrs, uint64_t first_entry, int64_t counted, int grad_dtype, int norm,       \
      uint64_t partials, uint64_t sums, uint64_t tickets, uint64_t counter, uint64_t acc, int has_acc,            \
      uint64_t result, float max_norm, uint64_t norms, uint64_t norms_index

#define FASTMUP_GRAD_NORM_FORWARD                                                                                \
  ntensors, nblocks, block, tensor_of_block, start_of_block, numels, grad_ptrs, first_entry, counted, grad_dtype, \
      norm, partials, sums, tickets, counter, acc, has_acc, result, max_norm, norms, norms_index

#define FASTMUP_GRAD_NORM_NAMES                                                                                  \
  pybind11::arg("ntensors"), pybind11::arg("nblocks"), pybind11::arg("block"), pybind11::arg("tensor_of_block"), \
      pybind11::arg("start_of_block"), pybind11::arg("numels"), pybind11::arg("grad_ptrs"),                      \
      pybind11::arg("first_entry"), pybind11::arg("counted"), pybind11::arg("grad_dtype"), pybind11::arg("norm"), \
      pybind11::arg("partials"), pybind11::arg("sums"), pybind11::arg("tickets"), pybind11::arg("counter"),      \
      pybind11::arg("acc"), pybind11::arg("has_acc"), pybind11::arg("result"), pybind11::arg("max_norm"),        \
      pybind11::arg("norms"), pybind11::arg("norms_index")

}  // namespace fastmup
