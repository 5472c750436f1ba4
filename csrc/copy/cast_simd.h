// Vector cast kernels for x86 CPUs, compiled for their instructions function by
// function (target attributes) so that the build runs on any x86-64 CPU;
// cast.cpp asks available() at run time before using a set. Results equal the
// portable kernels' (copy/cast.h) bit for bit, NaNs included.
#pragma once

#include "common/dtype.h"
#include "copy/cast.h"

// AVX2 + F16C (copy/cast_x86.cpp).
namespace fastckpt::simd::avx2 {

// True when this CPU has what the kernels need.
bool available();
// The vector kernel for from -> to, or nullptr when there is none.
CastFn find(DType from, DType to);
// The same with non-temporal stores, for large destinations not read soon; or nullptr.
CastFn find_streaming(DType from, DType to);

}  // namespace fastckpt::simd::avx2

// AVX-512 F/BW/VL/DQ, and AVX512-BF16 for fp32 -> bf16 (copy/cast_avx512.cpp).
// Pairs without a kernel here fall back to avx2's.
namespace fastckpt::simd::avx512 {

bool available();
CastFn find(DType from, DType to);
CastFn find_streaming(DType from, DType to);

}  // namespace fastckpt::simd::avx512
