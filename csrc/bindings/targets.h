// Destination tensors as the copy engine needs them: address, shape, strides,
// dtype and whether they live in host memory, read from each torch tensor once.
// Reading these through torch's Python API is most of a load's planning time
// for a model of 30k small tensors, so every consumer (the shape check, the
// device check, the copy tasks) shares this one read.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/dims.h"
#include "common/dtype.h"

namespace fastckpt::bindings {

struct Target {
  uint8_t* ptr = nullptr;
  Dims shape;
  Dims strides;                // elements
  std::optional<DType> dtype;    // nullopt: a torch dtype fastckpt cannot load into
  uint32_t dtype_object = 0;     // index into Targets::dtype_objects
  bool on_cpu = true;
  bool lazy_bits = false;        // a conjugate or negative view: memory differs from its values
};

struct Targets {
  std::vector<Target> items;
  std::vector<pybind11::object> dtype_objects;  // each distinct torch dtype once (for messages)
  bool all_cpu = true;
  bool any_lazy_bits = false;
};

// dtype_names maps torch dtypes to fastckpt dtype names (fastckpt.dtypes.DTYPE_NAMES).
Targets read_targets(const pybind11::list& tensors, const pybind11::dict& dtype_names);

}  // namespace fastckpt::bindings
