// Element-wise dtype conversion kernels used while copying. Every result equals
// torch's Tensor.to() on the CPU: round-to-nearest-even, overflow to inf (or,
// for the fp8 formats, to what torch gives: e4m3fn saturates to +-448, the fnuz
// formats give their NaN), and conversions from fp64 or to and from the 8-bit
// formats go through fp32 exactly as torch's do. NaN stays NaN; which NaN bit
// pattern comes out differs between torch's own kernels (0xffff from its AVX2
// fp32 -> bf16, a quiet NaN with the payload kept from AVX-512 BF16), so NaN
// payloads and signs are not promised.
//
// The common casts run on vector kernels chosen at run time by what the CPU
// has (AVX2, F16C); everywhere else the portable kernels run, with the same results.
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

// A kernel for from -> to that writes with non-temporal stores: faster for a
// large destination nobody reads soon (a model's weights), slower for a buffer
// read right after. Nullopt when there is none (use find_cast).
std::optional<CastFn> find_streaming_cast(DType from, DType to);

// "cannot cast C64 to F32: supported are ..." for error messages.
std::string unsupported_cast_text(DType from, DType to);

// Which kernels find_cast hands out: "avx2+f16c" or "portable". The environment
// variable FASTCKPT_CAST_KERNELS=portable forces the portable ones (for tests
// that compare both).
const char* cast_kernel_set();

// Scalar conversions, exposed for tests of the kernels themselves.
uint16_t float_to_bf16(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);
// For the five 8-bit float formats (F8_*): a byte to fp32 and fp32 to a byte.
float fp8_to_float(DType format, uint8_t v);
uint8_t float_to_fp8(DType format, float f);

}  // namespace fastckpt
