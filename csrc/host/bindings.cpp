// The `cpu` backend module: fastmup/ext loads it as _fastmup_cpu.
#include "../bindings_common.h"
#include "../grad_norm_bindings.h"
#include "grad_norm_host.h"
#include "multi_tensor_host.h"

namespace py = pybind11;
using namespace fastmup;

namespace fastmup {
namespace host {
void register_rounding(py::module_& m);  // rounding_host.cpp
}  // namespace host
}  // namespace fastmup

namespace {

template <void (*Run)(const MultiTensorArgs&, int)>
void launch(const MultiTensorArgs& a, int nthreads) {
  check_args(a);
  py::gil_scoped_release release;  // the update never touches Python objects
  Run(a, nthreads);
}

// One step of a launch plan whose fixed tables are in `fixed`, with this
// step's addresses as plain integers: the per-step call of fastmup.ext's
// cached host launches (copying the arguments and setting five properties
// from Python costs more than a small batch's update, with the interpreter's
// caches cold after a forward and backward).
template <void (*Run)(const MultiTensorArgs&, int)>
void launch_step(const MultiTensorArgs& fixed, uint64_t rows, uint64_t steps, uint64_t grad_scale, uint64_t found_inf,
                 uint64_t grad_clip, int nthreads) {
  MultiTensorArgs a = fixed;
  a.rows = address<const double>(rows);
  a.steps = address<const float>(steps);
  a.grad_scale = address<const float>(grad_scale);
  a.found_inf = address<const float>(found_inf);
  a.grad_clip = address<const float>(grad_clip);
  launch<Run>(a, nthreads);
}

// ESGD-M: the launch also advances its per-tensor scalar state
// (a.scalar_state: bc1, bc2, cum) and the step counts (a.steps) in place.
void launch_esgd(const MultiTensorArgs& args, int nthreads) {
  check_args(args);
  check_scalar_state(args, false);
  MultiTensorArgs a = args;
  a.steps_out = const_cast<float*>(a.steps);
  py::gil_scoped_release release;
  host::esgd(a, nthreads);
}

// The gradient norm of clipping over a batch's block map (csrc/grad_norm.h).
void launch_grad_norm(FASTMUP_GRAD_NORM_SIGNATURE, int nthreads) {
  const GradNormArgs a = make_grad_norm_args(FASTMUP_GRAD_NORM_FORWARD);
  py::gil_scoped_release release;
  host::grad_norm(a, nthreads);
}

// Element-wise storage conversions, exposed for tests of the bf16/fp16 rounding.
void cast_from_float(int code, uint64_t src, uint64_t dst, int64_t n) {
  const float* in = address<const float>(src);
  py::gil_scoped_release release;
  fastmup::dispatch_dtype(code, "storage", [&](auto tag) {
    using T = decltype(tag);
    T* out = address<T>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(in[i]);
  });
}

void cast_to_float(int code, uint64_t src, uint64_t dst, int64_t n) {
  float* out = address<float>(dst);
  py::gil_scoped_release release;
  fastmup::dispatch_dtype(code, "storage", [&](auto tag) {
    using T = decltype(tag);
    const T* in = address<const T>(src);
    for (int64_t i = 0; i < n; ++i) out[i] = to_float(in[i]);
  });
}

// The per-tensor helpers of common.h the functors use, exposed so that tests
// can check their exactness claims on many inputs.
void divide_by(float c, uint64_t src, uint64_t dst, int64_t n) {
  const float* in = address<const float>(src);
  float* out = address<float>(dst);
  const Divisor divide = Divisor::of(c);
  for (int64_t i = 0; i < n; ++i) out[i] = divide(in[i]);
}

py::tuple unscale_of(float scale) {
  const Unscale u = make_unscale(scale);
  return py::make_tuple(u.exact, u.factor, u.divisor);
}

void lerp_by(float w, uint64_t a, uint64_t b, uint64_t dst, int64_t n) {
  const float* x = address<const float>(a);
  const float* y = address<const float>(b);
  float* out = address<float>(dst);
  const Lerp lerp = Lerp::of(w);
  for (int64_t i = 0; i < n; ++i) out[i] = lerp(x[i], y[i]);
}

}  // namespace

PYBIND11_MODULE(_fastmup_cpu, m) {
  m.doc() = "fastmup multi-tensor optimizer updates on the host (the `cpu` backend)";
  m.attr("BLOCK") = py::int_(host::kBlock);
  bind_common(m);
#if defined(_OPENMP)
  m.attr("THREADING") = "openmp";
#else
  m.attr("THREADING") = "std::thread";
#endif
  m.def("adam", &launch<host::adam>, py::arg("args"), py::arg("nthreads"), "One Adam/AdamW step over a batch.");
  m.def("sgd", &launch<host::sgd>, py::arg("args"), py::arg("nthreads"), "One SGD step over a batch.");
  m.def("adam_step", &launch_step<host::adam>, py::arg("fixed"), py::arg("rows"), py::arg("steps"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("grad_clip"), py::arg("nthreads"),
        "adam() of `fixed` with this step's rows, steps, grad_scale, found_inf and grad_clip addresses (0: none).");
  m.def("sgd_step", &launch_step<host::sgd>, py::arg("fixed"), py::arg("rows"), py::arg("steps"), py::arg("grad_scale"),
        py::arg("found_inf"), py::arg("grad_clip"), py::arg("nthreads"),
        "sgd() of `fixed` with this step's rows, steps, grad_scale, found_inf and grad_clip addresses (0: none).");
  m.def("esgd", &launch_esgd, py::arg("args"), py::arg("nthreads"),
        "One ESGD-M step over a batch (advances its scalar state and steps).");
  m.def("grad_norm", &launch_grad_norm, FASTMUP_GRAD_NORM_NAMES, py::arg("nthreads"),
        "Per-tensor and total gradient norms over a batch (and the clip coefficient on the final launch).");
  m.def("isa", &host::isa_name, "The instruction-set variant of the update loops in use ('avx2' or 'generic').");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (name == "auto") host::isa_override() = host::Isa::kAuto;
        else if (name == "generic") host::isa_override() = host::Isa::kGeneric;
        else throw std::invalid_argument("set_isa: expected 'auto' or 'generic', got '" + name + "'");
      },
      py::arg("name"), "Force the baseline loops ('generic') or pick the best the CPU has ('auto').");
  m.def("cast_from_float", &cast_from_float, py::arg("code"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "Round n fp32 values to the storage dtype `code` (the backend's own conversion).");
  m.def("cast_to_float", &cast_to_float, py::arg("code"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "Widen n values of storage dtype `code` to fp32.");
  m.def("divide_by", &divide_by, py::arg("c"), py::arg("src"), py::arg("dst"), py::arg("n"),
        "n fp32 values divided by c as the functors divide by a per-tensor constant (Divisor).");
  m.def("unscale_of", &unscale_of, py::arg("scale"),
        "(exact, factor, divisor): how the functors undo a loss scale (Unscale).");
  m.def("lerp_by", &lerp_by, py::arg("w"), py::arg("a"), py::arg("b"), py::arg("dst"), py::arg("n"),
        "torch.lerp(a, b, w) of n fp32 pairs as the functors compute it (Lerp).");
  host::register_rounding(m);
}
