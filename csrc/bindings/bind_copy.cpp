#include "bindings/bindings.h"

namespace fastckpt::bindings {

void register_copy(pybind11::module_& /*m*/) {}

}  // namespace fastckpt::bindings
