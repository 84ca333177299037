// The `cuda` backend module: fastmup/ext loads it as _fastmup_cuda.  Built by
// the host C++ compiler and linked with the nvcc-compiled kernels; the CUDA
// stream and device come from Python (torch.cuda.current_stream()).
#include "bindings_common.h"
#include "cuda_api.h"

namespace py = pybind11;
using namespace fastmup;

namespace {

template <void (*Run)(const MultiTensorArgs&, int, uintptr_t)>
void launch(const MultiTensorArgs& a, int device, uint64_t stream) {
  check_args(a);
  py::gil_scoped_release release;
  Run(a, device, static_cast<uintptr_t>(stream));
}

// ESGD-M: the launch also advances its per-tensor scalar state
// (a.scalar_state) and the step counts (a.steps) in place; a.tickets elects
// the block that stores them.
void launch_esgd(const MultiTensorArgs& args, int device, uint64_t stream) {
  check_args(args);
  check_scalar_state(args, true);
  MultiTensorArgs a = args;
  a.steps_out = const_cast<float*>(a.steps);
  py::gil_scoped_release release;
  cuda::esgd(a, device, static_cast<uintptr_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_fastmup_cuda, m) {
  m.doc() = "fastmup multi-tensor optimizer kernels (the `cuda` backend)";
  m.attr("BLOCK") = py::int_(cuda::block_size());
  bind_common(m);
  m.def("adam", &launch<cuda::adam>, py::arg("args"), py::arg("device"), py::arg("stream"),
        "One Adam/AdamW launch over a batch (asynchronous, on `stream`).");
  m.def("sgd", &launch<cuda::sgd>, py::arg("args"), py::arg("device"), py::arg("stream"),
        "One SGD launch over a batch (asynchronous, on `stream`).");
  m.def("esgd", &launch_esgd, py::arg("args"), py::arg("device"), py::arg("stream"),
        "One ESGD-M launch over a batch; advances its scalar state and steps in the same launch (asynchronous).");
}
