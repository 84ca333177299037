// pybind11 glue shared by the host and CUDA modules.  A launch is described
// by one MultiTensorArgs (common.h), bound here once as a Python class whose
// fields are plain integers (addresses from data_ptr(), sizes, dtype codes),
// so the modules build without PyTorch's C++ headers or ABI.  fastmup.ext
// fills one per launch plan with what every launch of it passes, and copies
// it each step to set that step's values.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "adam_math.h"
#include "common.h"
#include "esgd_math.h"
#include "sgd_math.h"

namespace fastmup {

template <class T>
inline T* address(uint64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

template <class T>
inline uint64_t address_of(T* p) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p));
}

// Every table address a launch reads must be non-zero, except the optional
// ones (state rows, grad_scale, found_inf).
inline void check_args(const MultiTensorArgs& a) {
  if (a.ntensors < 0 || a.nblocks < 0 || a.block <= 0) throw std::invalid_argument("fastmup: bad batch sizes");
  if (a.storage < 0 || a.storage > 3) throw std::invalid_argument("fastmup: unknown parameter storage mode " + std::to_string(a.storage));
  if (a.nblocks > 0 && (((a.storage == 2 || a.storage == 3) && !a.storage_ptrs) || (a.storage == 1 && !a.tensor_ids)))
    throw std::invalid_argument("fastmup: the parameter storage mode's table address is 0");
  if (a.storage != 0 && a.param_dtype == kFloat32)
    throw std::invalid_argument("fastmup: parameter storage modes apply to bf16/fp16 parameters");
  if (a.storage == 3 && a.param_dtype != kBFloat16)
    throw std::invalid_argument("fastmup: remainders apply to bf16 parameters");
  if (a.nblocks > 0 && (!a.tensor_of_block || !a.start_of_block || !a.numels || !a.param_ptrs || !a.grad_ptrs || !a.rows ||
                        !a.steps))
    throw std::invalid_argument("fastmup: a required table address is 0");
}

// An algorithm that advances its per-tensor scalar state (ESGD-M) needs its
// columns; on CUDA also the tickets of its last-block election.
inline void check_scalar_state(const MultiTensorArgs& a, bool tickets) {
  for (double* column : a.scalar_state)
    if (!column) throw std::invalid_argument("fastmup: a scalar state address is 0");
  if (tickets && !a.tickets) throw std::invalid_argument("fastmup: the tickets address is 0");
}

namespace detail {

template <class T>
void def_address(pybind11::class_<MultiTensorArgs>& c, const char* name, T* MultiTensorArgs::*field, const char* doc) {
  c.def_property(
      name, [field](const MultiTensorArgs& a) { return address_of(a.*field); },
      [field](MultiTensorArgs& a, uint64_t v) { a.*field = address<T>(v); }, doc);
}

template <class T, size_t N>
void def_addresses(pybind11::class_<MultiTensorArgs>& c, const char* name, T* (MultiTensorArgs::*field)[N],
                   const char* doc) {
  c.def_property(
      name,
      [field](const MultiTensorArgs& a) {
        std::vector<uint64_t> out;
        for (T* p : a.*field) out.push_back(address_of(p));
        return out;
      },
      [field, name](MultiTensorArgs& a, const std::vector<uint64_t>& v) {
        if (v.size() > N)
          throw std::invalid_argument(std::string("fastmup: at most ") + std::to_string(N) + " " + name + " addresses");
        for (size_t k = 0; k < N; ++k) (a.*field)[k] = k < v.size() ? address<T>(v[k]) : nullptr;
      },
      doc);
}

}  // namespace detail

// The Python class MultiTensorArgs of module `m` (local to the module: the
// host and CUDA modules may both be loaded).
inline void bind_multi_tensor_args(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<MultiTensorArgs> c(m, "MultiTensorArgs", py::module_local(),
                                "One launch over a batch: its tables (addresses), sizes and dtype codes (csrc/common.h).");
  c.def(py::init<>()).def(py::init<const MultiTensorArgs&>(), py::arg("other"), "A copy of `other`.");
  c.def_readwrite("ntensors", &MultiTensorArgs::ntensors)
      .def_readwrite("nblocks", &MultiTensorArgs::nblocks, "entries of the block map")
      .def_readwrite("block", &MultiTensorArgs::block, "elements per block-map entry")
      .def_readwrite("ncols", &MultiTensorArgs::ncols, "columns of the hyperparameter table")
      .def_readwrite("param_dtype", &MultiTensorArgs::param_dtype, "storage dtype codes (enum DType)")
      .def_readwrite("grad_dtype", &MultiTensorArgs::grad_dtype)
      .def_readwrite("state_dtype", &MultiTensorArgs::state_dtype)
      .def_readwrite("hvp_step", &MultiTensorArgs::hvp_step, "ESGD-M: this step has Hessian-vector products")
      .def_readwrite("storage", &MultiTensorArgs::storage, "parameter storage mode (rounding.h, enum Storage)")
      .def_readwrite("rounding_prefix", &MultiTensorArgs::rounding_prefix, "the seed's part of the rounding bits' hash");
  detail::def_address(c, "tensor_of_block", &MultiTensorArgs::tensor_of_block, "int32 [nblocks]");
  detail::def_address(c, "start_of_block", &MultiTensorArgs::start_of_block, "int64 [nblocks]");
  detail::def_address(c, "numels", &MultiTensorArgs::numels, "int64 [ntensors]");
  detail::def_address(c, "param_ptrs", &MultiTensorArgs::param_ptrs, "int64 [ntensors] addresses");
  detail::def_address(c, "grad_ptrs", &MultiTensorArgs::grad_ptrs, "int64 [ntensors] addresses");
  detail::def_address(c, "rows", &MultiTensorArgs::rows, "float64 [ntensors, ncols] hyperparameters");
  detail::def_address(c, "steps", &MultiTensorArgs::steps, "float32 [ntensors] step counts");
  detail::def_address(c, "grad_scale", &MultiTensorArgs::grad_scale, "float32 [1], or 0: none");
  detail::def_address(c, "found_inf", &MultiTensorArgs::found_inf, "float32 [1], or 0: none");
  detail::def_address(c, "grad_clip", &MultiTensorArgs::grad_clip,
                      "float32 [1], or 0: none (a clip coefficient deferred into the step, csrc/grad_norm.h)");
  detail::def_address(c, "tickets", &MultiTensorArgs::tickets, "CUDA, ESGD-M: int32 [ntensors], zero between launches");
  detail::def_address(c, "storage_ptrs", &MultiTensorArgs::storage_ptrs,
                      "int64 [ntensors] addresses of the storage mode's buffer (fp32 master, int16 remainder), or 0");
  detail::def_address(c, "tensor_ids", &MultiTensorArgs::tensor_ids, "int64 [ntensors] tensor ids (stochastic rounding), or 0");
  detail::def_addresses(c, "state_ptrs", &MultiTensorArgs::state_ptrs,
                        "the int64 [ntensors] address rows of the state slots (0: no such buffer)");
  detail::def_addresses(c, "scalar_state", &MultiTensorArgs::scalar_state,
                        "ESGD-M: the float64 [ntensors] scalar state columns, advanced in place");
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

// What both modules have: the MultiTensorArgs class and LAYOUTS, each
// functor's columns and state slots by name (CI checks them against the
// algorithms' specs, so a column added on one side only fails a test).
inline void bind_common(pybind11::module_& m) {
  bind_multi_tensor_args(m);
  pybind11::dict layouts;
  layouts["AdamOp"] = layout_of<AdamOp>();
  layouts["SgdOp"] = layout_of<SgdOp>();
  layouts["EsgdOp"] = layout_of<EsgdOp>();
  m.attr("LAYOUTS") = layouts;
}

}  // namespace fastmup
