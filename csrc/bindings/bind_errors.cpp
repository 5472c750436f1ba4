#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "common/error.h"

namespace py = pybind11;

namespace fastckpt::bindings {

void register_errors(py::module_& m) {
  // CheckpointError subclasses ValueError so code catching the built-in still works.
  // Translators run newest first, so the subclass is registered after its base.
  auto base = py::register_exception<CheckpointError>(m, "CheckpointError", PyExc_ValueError);
  py::register_exception<LimitError>(m, "LimitError", base.ptr());
}

}  // namespace fastckpt::bindings
