// Moves elements between a dense buffer and a strided view, walking the view's
// logical (row-major) order from a given flat position.
#pragma once

#include <cstddef>
#include <cstdint>
#include "common/dims.h"

namespace fastckpt {

struct StridedView {
  uint8_t* base;  // address of element 0 (storage offset already applied)
  const Dims* shape;
  const Dims* strides;  // elements
  size_t itemsize;
};

// dense[0..n) = view elements [first, first + n) in logical order.
void gather(const StridedView& view, uint64_t first, uint64_t n, uint8_t* dense);
// view elements [first, first + n) = dense[0..n).
void scatter(const uint8_t* dense, uint64_t first, uint64_t n, const StridedView& view);

}  // namespace fastckpt
