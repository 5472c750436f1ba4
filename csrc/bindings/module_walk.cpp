// The tensors of model.state_dict(keep_vars=True), walked in C over the module
// tree's own dicts. fastckpt/load.py::_state_tensors documents the contract and
// keeps the fallback; this walk is the same loop without the interpreter's
// per-module cost (a 41k-module tree: ~42 ms in Python, 30-40 ms here; the rest
// is memory latency, each module's dicts being read once).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

struct Attrs {
  py::str parameters{"_parameters"}, buffers{"_buffers"}, modules{"_modules"},
      non_persistent{"_non_persistent_buffers_set"}, hooks{"_state_dict_hooks"},
      pre_hooks{"_state_dict_pre_hooks"}, save{"_save_to_state_dict"},
      extra_state{"get_extra_state"}, dict{"__dict__"};
};

py::object attr(PyObject* obj, const py::str& name) {
  PyObject* r = PyObject_GetAttr(obj, name.ptr());
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// A module's own attribute, from its instance dict (borrowed; nullptr when it is
// not there): one dict per module instead of a type lookup per attribute.
PyObject* own(PyObject* dict, const py::str& name) {
  PyObject* r = PyDict_GetItemWithError(dict, name.ptr());
  if (r == nullptr && PyErr_Occurred()) throw py::error_already_set();
  return r;
}

bool truthy(PyObject* o) {
  const int r = PyObject_IsTrue(o);
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

py::str concat(const py::str& a, PyObject* b) {
  PyObject* r = PyUnicode_Concat(a.ptr(), b);
  if (r == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(r);
}

// Adds dict's (name, value) pairs whose value is not None (and, given skip, whose
// name is not in it) to out under prefix + name.
void add_entries(const py::dict& out, const py::str& prefix, PyObject* dict, PyObject* skip) {
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (value == Py_None) continue;
    if (skip != nullptr) {
      const int found = PySet_Contains(skip, key);
      if (found < 0) throw py::error_already_set();
      if (found == 1) continue;
    }
    if (PyDict_SetItem(out.ptr(), concat(prefix, key).ptr(), value) < 0) throw py::error_already_set();
  }
}

// None when some module could make state_dict() differ from a plain walk (a
// class overriding _save_to_state_dict or get_extra_state, a state_dict hook),
// or keeps its tensors in anything but the dicts nn.Module makes (a ScriptModule,
// a module whose __init__ did not run): the caller then asks state_dict() itself.
py::object state_tensors(const py::handle& model, const py::handle& base_save,
                         const py::handle& base_extra_state) {
  static const Attrs* names = new Attrs();  // never freed: outlives the interpreter's teardown order
  std::unordered_map<PyTypeObject*, bool> plain_class;  // type -> no overrides
  py::dict out;
  std::vector<std::pair<py::str, py::object>> stack;
  stack.emplace_back(py::str(""), py::reinterpret_borrow<py::object>(model));
  const py::str dot(".");
  while (!stack.empty()) {
    auto [prefix, mod] = std::move(stack.back());
    stack.pop_back();
    PyTypeObject* cls = Py_TYPE(mod.ptr());
    auto known = plain_class.find(cls);
    if (known == plain_class.end()) {
      const auto type = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(cls));
      const bool plain = attr(type.ptr(), names->save).is(base_save) &&
                         attr(type.ptr(), names->extra_state).is(base_extra_state);
      known = plain_class.emplace(cls, plain).first;
    }
    if (!known->second) return py::none();
    const py::object vars = attr(mod.ptr(), names->dict);
    PyObject* d = vars.ptr();
    if (!PyDict_Check(d)) return py::none();
    PyObject* hooks = own(d, names->hooks);
    PyObject* pre_hooks = own(d, names->pre_hooks);
    PyObject* params = own(d, names->parameters);
    PyObject* buffers = own(d, names->buffers);
    PyObject* skip = own(d, names->non_persistent);
    PyObject* children = own(d, names->modules);
    if (hooks == nullptr || pre_hooks == nullptr || params == nullptr || buffers == nullptr ||
        skip == nullptr || children == nullptr || !PyDict_Check(params) || !PyDict_Check(buffers) ||
        !PyAnySet_Check(skip) || !PyDict_Check(children) || truthy(hooks) || truthy(pre_hooks)) {
      return py::none();
    }
    add_entries(out, prefix, params, nullptr);
    if (PyDict_GET_SIZE(buffers) > 0) add_entries(out, prefix, buffers, skip);
    const size_t first = stack.size();
    PyObject* key = nullptr;
    PyObject* child = nullptr;
    Py_ssize_t pos = 0;
    while (PyDict_Next(children, &pos, &key, &child)) {
      if (child == Py_None) continue;
      stack.emplace_back(concat(concat(prefix, key), dot.ptr()),
                         py::reinterpret_borrow<py::object>(child));
    }
    // The first child must come off the stack first: state_dict's depth-first order.
    std::reverse(stack.begin() + static_cast<std::ptrdiff_t>(first), stack.end());
  }
  return std::move(out);
}

// True when no object appears twice in the list (by identity): a model without
// tied tensors. One flat table of pointers; a set of 30k id() ints cost more.
bool all_distinct(const py::list& items) {
  const size_t n = items.size();
  unsigned bits = 4;
  while ((size_t{1} << bits) < 2 * n) ++bits;
  const size_t cap = size_t{1} << bits;
  std::vector<PyObject*> table(cap, nullptr);
  for (size_t k = 0; k < n; ++k) {
    PyObject* o = PyList_GET_ITEM(items.ptr(), static_cast<Py_ssize_t>(k));
    // Fibonacci hashing: the product's top bits depend on all of the address.
    size_t i = static_cast<size_t>((static_cast<uint64_t>(reinterpret_cast<uintptr_t>(o)) * 0x9E3779B97F4A7C15ull) >> (64 - bits));
    for (; table[i] != nullptr; i = (i + 1) & (cap - 1))
      if (table[i] == o) return false;
    table[i] = o;
  }
  return true;
}

}  // namespace

void register_module_walk(py::module_& m) {
  m.def("all_distinct", &all_distinct, py::arg("items"),
        "True when no object appears twice in the list (compared by identity).");
  m.def("state_tensors", &state_tensors, py::arg("model"), py::arg("base_save"),
        py::arg("base_extra_state"),
        "model.state_dict(keep_vars=True)'s tensors by a walk over the module tree's dicts; "
        "None when a module customises state_dict (its class or a hook).");
}

}  // namespace fastckpt::bindings
