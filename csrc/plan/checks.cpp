// The per-step checks of an optimizer's plan (fastmup.optim.optimizer), in
// one pass over the tensors: the `plan` extension module, the one module
// compiled against the installed torch's C++ headers (it reads tensors, not
// addresses).
//
// Why C++: a step must tell whether every parameter, state buffer and
// gradient is still what the plan was built for (addresses, dtype, size,
// device, layout).  From Python that is a method call per tensor and
// property, and the tensors' metadata is cold in the caches after a
// forward and backward, so each call waits for its own memory loads: about
// 2 us per tensor, more than torch's own optimizer loop.  Here the loads of
// successive tensors overlap.  Every function returns "no" rather than
// raising: the caller then takes the Python path, which explains.
#include <torch/csrc/autograd/python_variable.h>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style>;

// The device as one integer: type and index (no index: -1).
int64_t device_code(const c10::Device& d) {
  return (static_cast<int64_t>(d.type()) << 16) | static_cast<int64_t>(static_cast<uint16_t>(d.index()));
}

// Whether tensors[i].data_ptr() == expected[i] for every i (what
// Tensor.data_ptr() returns, copy-on-write materialised: the kernels write there).
bool same_addresses(const py::list& tensors, const Array<int64_t>& expected) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  if (expected.ndim() != 1 || expected.shape(0) != n) return false;
  const int64_t* e = expected.data();
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(tensors.ptr(), i);
      if (!THPVariable_Check(o)) return false;
      if (reinterpret_cast<int64_t>(THPVariable_Unpack(o).data_ptr()) != e[i]) return false;
    }
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

// Whether dicts[i].get(keys[i]) is values[i] for every i (the state buffers
// the plan holds are still the optimizer state's).
bool same_entries(const py::list& dicts, const py::list& keys, const py::list& values) {
  const Py_ssize_t n = PyList_GET_SIZE(dicts.ptr());
  if (PyList_GET_SIZE(keys.ptr()) != n || PyList_GET_SIZE(values.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts.ptr(), i);
    if (!PyDict_Check(d)) return false;
    PyObject* v = PyDict_GetItemWithError(d, PyList_GET_ITEM(keys.ptr(), i));  // borrowed
    if (v == nullptr) {
      PyErr_Clear();
      return false;
    }
    if (v != PyList_GET_ITEM(values.ptr(), i)) return false;
  }
  return true;
}

// (dtype codes, element counts, device codes) of dense tensors, as
// bind_grads compares them; None when one is not a dense tensor.
py::object kinds(const py::list& tensors) {
  const Py_ssize_t n = PyList_GET_SIZE(tensors.ptr());
  Array<int8_t> dtypes(n);
  Array<int64_t> numels(n), devices(n);
  auto dt = dtypes.mutable_unchecked<1>();
  auto ne = numels.mutable_unchecked<1>();
  auto dv = devices.mutable_unchecked<1>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(tensors.ptr(), i);
    if (!THPVariable_Check(o)) return py::none();
    const at::Tensor& t = THPVariable_Unpack(o);
    if (t.layout() != c10::kStrided) return py::none();
    dt(i) = static_cast<int8_t>(t.scalar_type());
    ne(i) = t.numel();
    dv(i) = device_code(t.device());
  }
  return py::make_tuple(dtypes, numels, devices);
}

// This step's gradients against the plan's: grads[i] is None, or a dense
// tensor with dtypes[i], numels[i] and devices[i], contiguous where fused[i]
// and, where fused[i], 16-byte aligned wherever previous[i] was.  Writes each
// gradient's address to addresses[i] (0 for None) and whether there is one
// to present[i].  Returns how many there are, or -1 where some gradient
// differs (nothing is to be trusted then).
int64_t bind_grads(const py::list& grads, const Array<int8_t>& dtypes, const Array<int64_t>& numels,
                   const Array<int64_t>& devices, const Array<uint8_t>& fused, const Array<int64_t>& previous,
                   Array<int64_t>& addresses, Array<uint8_t>& present) {
  const Py_ssize_t n = PyList_GET_SIZE(grads.ptr());
  for (const py::array* a : {static_cast<const py::array*>(&dtypes), static_cast<const py::array*>(&numels),
                             static_cast<const py::array*>(&devices), static_cast<const py::array*>(&fused),
                             static_cast<const py::array*>(&previous), static_cast<const py::array*>(&addresses),
                             static_cast<const py::array*>(&present)}) {
    if (a->ndim() != 1 || a->shape(0) != n) return -1;
  }
  const int8_t* dt = dtypes.data();
  const int64_t* ne = numels.data();
  const int64_t* dv = devices.data();
  const uint8_t* fu = fused.data();
  const int64_t* prev = previous.data();
  int64_t* out = addresses.mutable_data();
  uint8_t* has = present.mutable_data();
  int64_t count = 0;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(grads.ptr(), i);
      if (o == Py_None) {
        out[i] = 0;
        has[i] = 0;
        continue;
      }
      if (!THPVariable_Check(o)) return -1;
      const at::Tensor& g = THPVariable_Unpack(o);
      if (g.layout() != c10::kStrided || static_cast<int8_t>(g.scalar_type()) != dt[i] || g.numel() != ne[i] ||
          device_code(g.device()) != dv[i])
        return -1;
      if (fu[i] && !g.is_contiguous()) return -1;
      const int64_t ptr = reinterpret_cast<int64_t>(g.data_ptr());
      if (fu[i] && (ptr & 15) != 0 && (prev[i] & 15) == 0) return -1;  // the kernel's aligned path was chosen
      out[i] = ptr;
      has[i] = 1;
      ++count;
    }
  } catch (const std::exception&) {
    return -1;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_fastmup_plan, m) {
  m.doc() = "fastmup: the per-step checks of an optimizer's plan over its tensors";
  m.def("same_addresses", &same_addresses, py::arg("tensors"), py::arg("expected"));
  m.def("same_entries", &same_entries, py::arg("dicts"), py::arg("keys"), py::arg("values"));
  m.def("kinds", &kinds, py::arg("tensors"));
  m.def("bind_grads", &bind_grads, py::arg("grads"), py::arg("dtypes"), py::arg("numels"), py::arg("devices"),
        py::arg("fused"), py::arg("previous"), py::arg("addresses").noconvert(), py::arg("present").noconvert());
}
