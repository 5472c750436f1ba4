// Element-wise dtype conversion kernels used while copying. Rounding follows
// torch's Tensor.to(): round-to-nearest-even, NaN stays NaN, overflow -> inf,
// fp64 -> fp16/bf16 goes through fp32 exactly as torch does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/dtype.h"

namespace fastckpt {

// Converts n contiguous elements; src and dst must not overlap.
using CastFn = void (*)(const void* src, void* dst, size_t n);

// The kernel for from -> to (a plain copy when they are equal), or nullopt
// when the pair is not supported.
std::optional<CastFn> find_cast(DType from, DType to);

// "cannot cast F8_E4M3 to F32: supported are ..." for error messages.
std::string unsupported_cast_text(DType from, DType to);

// Scalar conversions, exposed for tests of the kernels themselves.
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);

}  // namespace fastckpt
