// The `cuda` backend module: fastmup/ext loads it as _fastmup_cuda.  Built by
// the host C++ compiler and linked with the nvcc-compiled kernels; the CUDA
// stream and device come from Python (torch.cuda.current_stream()).
#include "bindings_common.h"
#include "cuda_api.h"

namespace py = pybind11;
using namespace fastmup;

namespace {

template <void (*Run)(const MultiTensorArgs&, int, uintptr_t)>
void launch(FASTMUP_ARGS_SIGNATURE, int device, uint64_t stream) {
  const MultiTensorArgs a = make_args(FASTMUP_ARGS_FORWARD);
  py::gil_scoped_release release;
  Run(a, device, static_cast<uintptr_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_fastmup_cuda, m) {
  m.doc() = "fastmup multi-tensor optimizer kernels (the `cuda` backend)";
  m.attr("BLOCK") = py::int_(cuda::block_size());
  m.def("adam", &launch<cuda::adam>, FASTMUP_ARGS_NAMES, py::arg("device"), py::arg("stream"),
        "One Adam/AdamW launch over a batch (asynchronous, on `stream`).");
  m.def("sgd", &launch<cuda::sgd>, FASTMUP_ARGS_NAMES, py::arg("device"), py::arg("stream"),
        "One SGD launch over a batch (asynchronous, on `stream`).");
}
