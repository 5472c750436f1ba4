// Vector cast kernels for x86 CPUs with AVX2 and F16C, compiled for those
// instructions function by function (target attributes) so that the build runs
// on any x86-64 CPU; cast.cpp asks available() at run time before using them.
// Results equal the portable kernels' (copy/cast.h), NaN bit patterns aside.
#pragma once

#include "common/dtype.h"
#include "copy/cast.h"

namespace fastckpt::simd {

// True when this CPU has what the kernels need.
bool available();
// "avx2+f16c".
const char* name();
// The vector kernel for from -> to, or nullptr when there is none.
CastFn find(DType from, DType to);
// The same with non-temporal stores, for large destinations not read soon; or nullptr.
CastFn find_streaming(DType from, DType to);

}  // namespace fastckpt::simd
