// Element-wise dtype conversion kernels used while copying. Every result equals
// torch's Tensor.to() on an x86 CPU bit for bit: round-to-nearest-even, overflow
// to inf (or, for the fp8 formats, to what torch gives: e4m3fn saturates to
// +-448, the fnuz formats give their NaN), and conversions from fp64 or to and
// from the 8-bit formats go through fp32 exactly as torch's do. NaNs too: torch's
// NaN bit patterns depend on its kernel, and these are the ones its vector
// kernels (ATen's AVX2 and AVX-512 capability) write: fp32/fp64 -> bf16 gives
// 0xffff, fp16/fp8 -> bf16 0x7fc0 (element by element through c10::BFloat16),
// fp16 <-> fp32 keeps the payload and sets the quiet bit (F16C), and each fp8
// NaN code decodes to c10's fp32 pattern. (A torch running its scalar kernels,
// ATEN_CPU_CAPABILITY=default, writes 0x7fc0 for fp32 -> bf16 NaNs instead.)
//
// The common casts run on vector kernels chosen at run time by what the CPU
// has (AVX-512, else AVX2 + F16C); everywhere else the portable kernels run,
// with the same results.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/dtype.h"

namespace fastckpt {

// Converts n contiguous elements; src and dst must not overlap.
using CastFn = void (*)(const void* src, void* dst, size_t n);

// Which kernels to hand out. Best: the fastest this CPU runs (what loads use).
// The others pin one set, so that tests check every set on a CPU that has a
// better one; a vector set falls back to the next set down for pairs it has no
// kernel of (AVX-512 -> AVX2 -> portable).
enum class CastKernels { Best, Avx512, Avx2, Portable };

// Whether this CPU runs the set (Best and Portable: always).
bool cast_kernels_available(CastKernels set);

// The kernel for from -> to (a plain copy when they are equal), or nullopt
// when the pair is not supported. `set` must be available.
std::optional<CastFn> find_cast(DType from, DType to, CastKernels set = CastKernels::Best);

// A kernel for from -> to that writes with non-temporal stores: faster for a
// large destination nobody reads soon (a model's weights), slower for a buffer
// read right after. Nullopt when there is none (use find_cast).
std::optional<CastFn> find_streaming_cast(DType from, DType to, CastKernels set = CastKernels::Best);

// "cannot cast C64 to F32: supported are ..." for error messages.
std::string unsupported_cast_text(DType from, DType to);

// Which kernels find_cast hands out by default: "avx512", "avx2+f16c" or
// "portable". The environment variable FASTCKPT_CAST_KERNELS=avx2 or =portable
// caps them at that set (a way out should a vector kernel misbehave on some CPU).
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
