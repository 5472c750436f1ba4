// fastckpt._core: the compiled core. Private; users import fastckpt.
#include "bindings/bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastckpt compiled core (private): readers, rules, copy engine";
  fastckpt::bindings::register_errors(m);
  fastckpt::bindings::register_formats(m);
  fastckpt::bindings::register_rules(m);
  fastckpt::bindings::register_targets(m);
  fastckpt::bindings::register_module_walk(m);
  fastckpt::bindings::register_copy(m);
}
