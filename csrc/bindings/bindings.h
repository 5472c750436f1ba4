// One register_* function per area; module.cpp calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace fastckpt::bindings {

void register_errors(pybind11::module_& m);
void register_formats(pybind11::module_& m);
void register_rules(pybind11::module_& m);
void register_targets(pybind11::module_& m);
void register_module_walk(pybind11::module_& m);
void register_copy(pybind11::module_& m);

}  // namespace fastckpt::bindings
