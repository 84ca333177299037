// The `cuda` backend module: fastmup/ext loads it as _fastmup_cuda.  Built by
// the host C++ compiler and linked with the nvcc-compiled kernels; the CUDA
// stream and device come from Python (torch.cuda.current_stream()).
#include "adam_math.h"
#include "bindings_common.h"
#include "esgd_math.h"
#include "sgd_math.h"
#include "cuda_api.h"
#include "grad_norm_bindings.h"
#include "grad_norm_cuda_api.h"

namespace py = pybind11;
using namespace fastmup;

namespace {

template <void (*Run)(const MultiTensorArgs&, int, uintptr_t)>
void launch(FASTMUP_ARGS_SIGNATURE, int device, uint64_t stream) {
  const MultiTensorArgs a = make_args(FASTMUP_ARGS_FORWARD);
  py::gil_scoped_release release;
  Run(a, device, static_cast<uintptr_t>(stream));
}

void launch_esgd(FASTMUP_ARGS_SIGNATURE, const std::vector<uint64_t>& scalar_state, uint64_t tickets, int hvp_step, int device,
                 uint64_t stream) {
  MultiTensorArgs a = make_args(FASTMUP_ARGS_FORWARD);
  if (scalar_state.size() != 3 || !scalar_state[0] || !scalar_state[1] || !scalar_state[2] || tickets == 0) throw std::invalid_argument("fastmup esgd: a scalar state/ticket address is 0");
  for (int k = 0; k < 3; ++k) a.scalar_state[k] = address<double>(scalar_state[k]);
  a.steps_out = address<float>(steps);
  a.tickets = address<int32_t>(tickets);
  a.hvp_step = hvp_step;
  py::gil_scoped_release release;
  cuda::esgd(a, device, static_cast<uintptr_t>(stream));
}

void launch_grad_norm(FASTMUP_GRAD_NORM_SIGNATURE, int device, uint64_t stream) {
  const GradNormArgs a = make_grad_norm_args(FASTMUP_GRAD_NORM_FORWARD);
  py::gil_scoped_release release;
  cuda::grad_norm(a, device, static_cast<uintptr_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_fastmup_cuda, m) {
  m.doc() = "fastmup multi-tensor optimizer kernels (the `cuda` backend)";
  m.attr("BLOCK") = py::int_(cuda::block_size());
  // Each functor's columns and state slots, by name: CI checks them against
  // the algorithms' specs, so a column added on one side only fails a test.
  py::dict layouts;
  layouts["AdamOp"] = layout_of<AdamOp>();
  layouts["SgdOp"] = layout_of<SgdOp>();
  layouts["EsgdOp"] = layout_of<EsgdOp>();
  m.attr("LAYOUTS") = layouts;
  m.def("adam", &launch<cuda::adam>, FASTMUP_ARGS_NAMES, py::arg("device"), py::arg("stream"),
        "One Adam/AdamW launch over a batch (asynchronous, on `stream`).");
  m.def("sgd", &launch<cuda::sgd>, FASTMUP_ARGS_NAMES, py::arg("device"), py::arg("stream"),
        "One SGD launch over a batch (asynchronous, on `stream`).");
  m.attr("GRAD_NORM_BLOCK") = py::int_(cuda::grad_norm_block_size());
  m.def("grad_norm", &launch_grad_norm, FASTMUP_GRAD_NORM_NAMES, py::arg("device"), py::arg("stream"),
        "Per-tensor and total gradient norms over a batch (asynchronous, on `stream`).");
  m.def("esgd", &launch_esgd, FASTMUP_ARGS_NAMES, py::arg("scalar_state"), py::arg("tickets"), py::arg("hvp_step"),
        py::arg("device"), py::arg("stream"),
        "One ESGD-M launch over a batch; advances its scalar state and steps in the same launch (asynchronous).");
}
