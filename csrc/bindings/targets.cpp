#include "bindings/targets.h"

#include <algorithm>

#include <pybind11/stl.h>

#include <unordered_map>

#include "bindings/bindings.h"

#include "common/error.h"
#include "formats/checkpoint_index.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

// Attribute names interned once: the C API calls below skip pybind11's
// per-call argument packing, which cost as much as torch's getters themselves.
struct Names {
  py::str data_ptr{"data_ptr"}, shape{"shape"}, is_contiguous{"is_contiguous"}, stride{"stride"},
      dtype{"dtype"}, is_cpu{"is_cpu"}, is_neg{"is_neg"}, is_conj{"is_conj"};
};

py::object call0(const py::handle& obj, const py::str& method) {
  PyObject* r = PyObject_CallMethodNoArgs(obj.ptr(), method.ptr());
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// torch.Size and the tuple stride() returns: tuples of ints.
void ints_of(const py::handle& tuple, Dims& out) {
  if (!PyTuple_Check(tuple.ptr())) throw py::type_error("expected a tuple of ints");
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple.ptr());
  out.fill(static_cast<size_t>(n), 0);
  for (Py_ssize_t k = 0; k < n; ++k) {
    long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple.ptr(), k));
    if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
    out[static_cast<size_t>(k)] = v;
  }
}

}  // namespace

Targets read_targets(const py::list& tensors, const py::dict& dtype_names) {
  static const Names* names = new Names();  // never freed: outlives the interpreter's teardown order
  Targets out;
  out.items.resize(tensors.size());
  // torch dtypes are singletons: each is looked up once, by identity.
  std::unordered_map<PyObject*, std::pair<std::optional<DType>, uint32_t>> dtypes;
  for (size_t i = 0; i < out.items.size(); ++i) {
    Target& t = out.items[i];
    const py::handle tensor = tensors[i];
    t.ptr = reinterpret_cast<uint8_t*>(
        static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(call0(tensor, names->data_ptr).ptr())));
    if (PyErr_Occurred()) throw py::error_already_set();
    ints_of(tensor.attr(names->shape), t.shape);
    if (call0(tensor, names->is_contiguous).ptr() == Py_True) {
      t.strides.fill(t.shape.size(), 1);
      for (size_t d = t.shape.size(); d-- > 1;) t.strides[d - 1] = t.strides[d] * std::max<int64_t>(t.shape[d], 1);
    } else {
      ints_of(call0(tensor, names->stride), t.strides);
    }
    py::object dt = tensor.attr(names->dtype);
    auto found = dtypes.find(dt.ptr());
    if (found == dtypes.end()) {
      PyObject* dname = PyDict_GetItem(dtype_names.ptr(), dt.ptr());  // borrowed
      std::optional<DType> d;
      if (dname != nullptr) d = dtype_from_name(py::handle(dname).cast<std::string>());
      found = dtypes.emplace(dt.ptr(), std::make_pair(d, static_cast<uint32_t>(out.dtype_objects.size()))).first;
      out.dtype_objects.push_back(std::move(dt));
    }
    t.dtype = found->second.first;
    t.dtype_object = found->second.second;
    t.on_cpu = tensor.attr(names->is_cpu).ptr() == Py_True;
    out.all_cpu = out.all_cpu && t.on_cpu;
    t.lazy_bits = call0(tensor, names->is_neg).ptr() == Py_True || call0(tensor, names->is_conj).ptr() == Py_True;
    out.any_lazy_bits = out.any_lazy_bits || t.lazy_bits;
  }
  return out;
}

void register_targets(py::module_& m) {
  py::class_<Targets>(m, "Targets")
      .def(py::init(&read_targets), py::arg("tensors"), py::arg("dtype_names"),
           "Read every destination tensor's address, shape, strides, dtype and device once.")
      .def("__len__", [](const Targets& t) { return t.items.size(); })
      .def_property_readonly("all_cpu", [](const Targets& t) { return t.all_cpu; })
      // Positions of conjugate or negative views (their memory does not read as their values).
      .def("lazy_views",
           [](const Targets& t) {
             std::vector<size_t> out;
             if (t.any_lazy_bits)
               for (size_t k = 0; k < t.items.size(); ++k)
                 if (t.items[k].lazy_bits) out.push_back(k);
             return out;
           })
      // Positions whose checkpoint tensor (sources[k] = file << 32 | tensor), with
      // its first dimension replaced by dim0[k] where that is not None (a row
      // selection), differs in shape from the destination.
      .def(
          "mismatched",
          [](const Targets& t, const py::list& indexes, const py::list& sources,
             const py::object& dim0) {
            if (sources.size() != t.items.size()) throw py::value_error("sources and targets differ in length");
            std::vector<const CheckpointIndex*> files;
            for (const auto& i : indexes) files.push_back(&i.cast<const CheckpointIndex&>());
            const py::list rows = dim0.is_none() ? py::list() : dim0.cast<py::list>();
            py::list out;
            for (size_t k = 0; k < t.items.size(); ++k) {
              const auto loc = sources[k].cast<uint64_t>();
              const size_t fi = static_cast<size_t>(loc >> 32);
              if (fi >= files.size()) throw py::index_error("source file index out of range");
              const auto& shape = files[fi]->tensors.at(static_cast<size_t>(loc & 0xFFFFFFFFu)).shape;
              const auto& dst = t.items[k].shape;
              bool same = shape.size() == dst.size();
              for (size_t d = 0; same && d < shape.size(); ++d) {
                int64_t want = shape[d];
                if (d == 0 && !dim0.is_none() && !rows[k].is_none()) want = rows[k].cast<int64_t>();
                same = want == dst[d];
              }
              if (!same) out.append(k);
            }
            return out;
          },
          py::arg("indexes"), py::arg("sources"), py::arg("dim0") = py::none())
      .def(
          "subset",
          [](const Targets& t, const std::vector<size_t>& keep) {
            Targets out;
            out.dtype_objects = t.dtype_objects;
            for (size_t k : keep) {
              out.items.push_back(t.items.at(k));
              out.all_cpu = out.all_cpu && t.items[k].on_cpu;
              out.any_lazy_bits = out.any_lazy_bits || t.items[k].lazy_bits;
            }
            return out;
          },
          py::arg("keep"), "The targets at these positions, in this order.");
}

}  // namespace fastckpt::bindings
