#include "copy/cast.h"

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "copy/cast_simd.h"

namespace fastckpt {
namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Storage-only wrappers so templates can tell the narrow float formats apart.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
template <DType K>
struct F8 {
  static constexpr DType kind = K;
  uint8_t bits;
};
template <typename T>
struct IsF8 : std::false_type {};
template <DType K>
struct IsF8<F8<K>> : std::true_type {};

// The four fp8 formats with a sign, exponent and mantissa, as torch rounds
// fp32 into them: the first fp32 value (as bits, sign cleared) that no longer
// rounds to a finite value, and what it and NaN become.
struct Fp8Format {
  int mantissa_bits;
  int bias;
  uint32_t overflow_from;
  bool fnuz;           // no infinity, no -0, NaN is 0x80
  uint8_t nan;         // or'ed with the sign unless fnuz
  uint8_t overflow;    // or'ed with the sign unless fnuz
};

constexpr Fp8Format fp8_format(DType k) {
  switch (k) {
    case DType::F8_E4M3: return {3, 7, 1087u << 20, false, 0x7f, 0x7e};     // 480: saturates to 448
    case DType::F8_E5M2: return {2, 15, 143u << 23, false, 0x7f, 0x7c};     // 65536: inf
    case DType::F8_E4M3FNUZ: return {3, 8, 0x87u << 23, true, 0x80, 0x80};  // 256: NaN
    case DType::F8_E5M2FNUZ: return {2, 16, 0x8Fu << 23, true, 0x80, 0x80}; // 65536: NaN
    default: return {0, 0, 0, false, 0, 0};
  }
}

template <DType K>
uint8_t encode_fp8(float f) {
  if constexpr (K == DType::F8_E8M0) {
    // An exponent only, no sign: the magnitude's exponent rounded to nearest
    // even on the mantissa (the implied 1 of a normal number is the odd bit).
    const uint32_t u = bits_of(f);
    const uint32_t exponent = (u >> 23) & 0xffu;
    if (exponent == 0xffu) return 0xff;  // inf, NaN
    const uint32_t mantissa = u & 0x7fffffu;
    const bool up = mantissa > 0x400000u || (mantissa == 0x400000u && exponent > 0);
    return static_cast<uint8_t>(exponent + (up ? 1u : 0u));  // 254 rounding up is 255: NaN
  } else {
    constexpr Fp8Format fmt = fp8_format(K);
    constexpr int shift = 23 - fmt.mantissa_bits;
    uint32_t u = bits_of(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    const auto sign_bit = static_cast<uint8_t>(sign >> 24);
    if (u >= fmt.overflow_from) {
      const uint8_t r = u > 0x7f800000u ? fmt.nan : fmt.overflow;
      return fmt.fnuz ? r : static_cast<uint8_t>(r | sign_bit);
    }
    constexpr uint32_t min_normal = static_cast<uint32_t>(127 - fmt.bias + 1) << 23;
    uint8_t r;
    if (u < min_normal) {
      // Below the smallest normal: an FP add aligns the value to the subnormal
      // step and rounds it (to nearest even) in one go.
      constexpr uint32_t magic = static_cast<uint32_t>((127 - fmt.bias) + shift + 1) << 23;
      r = static_cast<uint8_t>(bits_of(float_of(u) + float_of(magic)) - magic);
      if (fmt.fnuz && r == 0) return 0;  // no negative zero
    } else {
      const uint32_t odd = (u >> shift) & 1u;
      u += (static_cast<uint32_t>(fmt.bias - 127) << 23) + ((1u << (shift - 1)) - 1u) + odd;
      r = static_cast<uint8_t>(u >> shift);
      // e4m3fn: values in (464, 480) round up to the NaN code; torch saturates them.
      if (!fmt.fnuz && r == fmt.nan) r = fmt.overflow;
    }
    return static_cast<uint8_t>(r | sign_bit);
  }
}

float decode_fp8(DType k, uint8_t v) {
  if (k == DType::F8_E8M0) return v == 0xff ? float_of(0x7f800001u) : std::ldexp(1.0f, int{v} - 127);
  const Fp8Format fmt = fp8_format(k);
  const int m = fmt.mantissa_bits;
  const int e_max = (1 << (7 - m)) - 1;
  const bool negative = (v & 0x80) != 0;
  const int exponent = (v >> m) & e_max;
  const int mantissa = v & ((1 << m) - 1);
  // NaN codes decode to the fp32 bits c10 gives them (torch's fp8 -> fp32).
  const uint32_t sign = negative ? 0x80000000u : 0u;
  if (fmt.fnuz && v == 0x80) return float_of(0x7f800001u);
  if (k == DType::F8_E4M3 && (v & 0x7f) == 0x7f) return float_of(sign | 0x7ff00000u);
  if (k == DType::F8_E5M2 && exponent == e_max) {
    // e5m2 is fp16's top byte: its NaNs widen as fp16's do (quiet bit set).
    const uint32_t payload = static_cast<uint32_t>(mantissa) << 21;
    return float_of(sign | 0x7f800000u | payload | (mantissa != 0 ? 0x400000u : 0u));
  }
  const float magnitude = exponent == 0
                              ? std::ldexp(static_cast<float>(mantissa), 1 - fmt.bias - m)
                              : std::ldexp(static_cast<float>((1 << m) + mantissa), exponent - fmt.bias - m);
  return negative ? -magnitude : magnitude;
}

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, Half>) {
    return half_to_float(v.bits);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return bf16_to_float(v.bits);
  } else {
    return static_cast<float>(v);  // fp64 rounds to fp32 first, as torch does
  }
}

// torch converts fp16 and the fp8 formats to bf16 element by element through
// c10::BFloat16(float), whose NaN is 0x7fc0 (fp32 and fp64 go through its vector
// kernels: 0xffff, float_to_bf16).
uint16_t narrow_to_bf16(float f) { return std::isnan(f) ? uint16_t{0x7fc0} : float_to_bf16(f); }

template <typename To>
To from_float(float f) {
  if constexpr (std::is_same_v<To, Half>) {
    return Half{float_to_half(f)};
  } else if constexpr (std::is_same_v<To, BFloat16>) {
    return BFloat16{float_to_bf16(f)};
  } else if constexpr (IsF8<To>::value) {
    return To{encode_fp8<To::kind>(f)};
  } else {
    return static_cast<To>(f);
  }
}

// FASTCKPT_CAST_KERNELS=avx2 or =portable caps the sets loads use (a way out
// should a kernel misbehave on some CPU, and the before/after of benchmarks).
bool capped_at(const char* set) {
  const char* v = std::getenv("FASTCKPT_CAST_KERNELS");
  return v != nullptr && std::strcmp(v, set) == 0;
}

// What Best means on this CPU, decided once.
CastKernels best_kernels() {
  static const CastKernels best = [] {
    if (capped_at("portable")) return CastKernels::Portable;
    if (simd::avx512::available() && !capped_at("avx2")) return CastKernels::Avx512;
    return simd::avx2::available() ? CastKernels::Avx2 : CastKernels::Portable;
  }();
  return best;
}

// The vector kernel of `set` (or of the sets below it) for from -> to, or nullptr.
CastFn vector_kernel(DType from, DType to, CastKernels set, bool streaming) {
  if (set == CastKernels::Best) set = best_kernels();
  CastFn fn = nullptr;
  if (set == CastKernels::Avx512) fn = streaming ? simd::avx512::find_streaming(from, to) : simd::avx512::find(from, to);
  if (fn == nullptr && (set == CastKernels::Avx512 || set == CastKernels::Avx2))
    fn = streaming ? simd::avx2::find_streaming(from, to) : simd::avx2::find(from, to);
  return fn;
}

template <typename From, typename To>
To convert(From v) {
  if constexpr (std::is_integral_v<From> && std::is_integral_v<To>) {
    return static_cast<To>(v);  // integer widening: exact
  } else if constexpr (std::is_same_v<To, double>) {
    if constexpr (std::is_same_v<From, double>) return v;
    else return static_cast<double>(to_float(v));  // exact
  } else if constexpr (std::is_same_v<From, double> && std::is_same_v<To, float>) {
    return static_cast<float>(v);
  } else if constexpr (std::is_same_v<From, Half> && std::is_same_v<To, BFloat16>) {
    return BFloat16{narrow_to_bf16(half_to_float(v.bits))};
  } else {
    return from_float<To>(to_float(v));
  }
}

template <typename From, typename To>
void cast_kernel(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const From*>(src);
  auto* out = static_cast<To*>(dst);
  for (size_t i = 0; i < n; ++i) out[i] = convert<From, To>(in[i]);
}

// From an 8-bit format every result is one of 256: a table, made once.
template <DType K, typename To>
struct Fp8Table {
  std::array<To, 256> values;
  Fp8Table() {
    for (size_t b = 0; b < 256; ++b) {
      const float f = decode_fp8(K, static_cast<uint8_t>(b));
      if constexpr (std::is_same_v<To, double>) values[b] = static_cast<double>(f);
      else if constexpr (std::is_same_v<To, BFloat16>) values[b] = BFloat16{narrow_to_bf16(f)};
      else values[b] = from_float<To>(f);
    }
  }
};

template <DType K, typename To>
void fp8_kernel(const void* src, void* dst, size_t n) {
  static const Fp8Table<K, To> table;
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<To*>(dst);
  for (size_t i = 0; i < n; ++i) out[i] = table.values[in[i]];
}

// complex32 <-> complex64 and complex64 <-> complex128: part by part.
template <typename From, typename To>
void complex_kernel(const void* src, void* dst, size_t n) {
  cast_kernel<From, To>(src, dst, 2 * n);
}

template <size_t Itemsize>
void copy_kernel(const void* src, void* dst, size_t n) {
  std::memcpy(dst, src, n * Itemsize);
}

struct CastEntry {
  DType from;
  DType to;
  CastFn fn;
};

// Every floating type to every other, as Tensor.to() converts them.
template <typename From>
constexpr CastFn float_cast_to(DType to) {
  switch (to) {
    case DType::F16: return &cast_kernel<From, Half>;
    case DType::BF16: return &cast_kernel<From, BFloat16>;
    case DType::F32: return &cast_kernel<From, float>;
    case DType::F64: return &cast_kernel<From, double>;
    case DType::F8_E4M3: return &cast_kernel<From, F8<DType::F8_E4M3>>;
    case DType::F8_E5M2: return &cast_kernel<From, F8<DType::F8_E5M2>>;
    case DType::F8_E4M3FNUZ: return &cast_kernel<From, F8<DType::F8_E4M3FNUZ>>;
    case DType::F8_E5M2FNUZ: return &cast_kernel<From, F8<DType::F8_E5M2FNUZ>>;
    case DType::F8_E8M0: return &cast_kernel<From, F8<DType::F8_E8M0>>;
    default: return nullptr;
  }
}

template <DType K>
constexpr CastFn fp8_cast_to(DType to) {
  switch (to) {
    case DType::F16: return &fp8_kernel<K, Half>;
    case DType::BF16: return &fp8_kernel<K, BFloat16>;
    case DType::F32: return &fp8_kernel<K, float>;
    case DType::F64: return &fp8_kernel<K, double>;
    case DType::F8_E4M3: return &fp8_kernel<K, F8<DType::F8_E4M3>>;
    case DType::F8_E5M2: return &fp8_kernel<K, F8<DType::F8_E5M2>>;
    case DType::F8_E4M3FNUZ: return &fp8_kernel<K, F8<DType::F8_E4M3FNUZ>>;
    case DType::F8_E5M2FNUZ: return &fp8_kernel<K, F8<DType::F8_E5M2FNUZ>>;
    case DType::F8_E8M0: return &fp8_kernel<K, F8<DType::F8_E8M0>>;
    default: return nullptr;
  }
}

CastFn portable_float_cast(DType from, DType to) {
  switch (from) {
    case DType::F16: return float_cast_to<Half>(to);
    case DType::BF16: return float_cast_to<BFloat16>(to);
    case DType::F32: return float_cast_to<float>(to);
    case DType::F64: return float_cast_to<double>(to);
    case DType::F8_E4M3: return fp8_cast_to<DType::F8_E4M3>(to);
    case DType::F8_E5M2: return fp8_cast_to<DType::F8_E5M2>(to);
    case DType::F8_E4M3FNUZ: return fp8_cast_to<DType::F8_E4M3FNUZ>(to);
    case DType::F8_E5M2FNUZ: return fp8_cast_to<DType::F8_E5M2FNUZ>(to);
    case DType::F8_E8M0: return fp8_cast_to<DType::F8_E8M0>(to);
    default: return nullptr;
  }
}

#define FASTCKPT_CAST(F, TF, T, TT) {DType::F, DType::T, &cast_kernel<TF, TT>}

// Lossless integer widening and the complex widths; floats are above.
const CastEntry kOtherCasts[] = {
    FASTCKPT_CAST(I8, int8_t, I16, int16_t),
    FASTCKPT_CAST(I8, int8_t, I32, int32_t),
    FASTCKPT_CAST(I8, int8_t, I64, int64_t),
    FASTCKPT_CAST(I16, int16_t, I32, int32_t),
    FASTCKPT_CAST(I16, int16_t, I64, int64_t),
    FASTCKPT_CAST(I32, int32_t, I64, int64_t),
    FASTCKPT_CAST(U8, uint8_t, I16, int16_t),
    FASTCKPT_CAST(U8, uint8_t, I32, int32_t),
    FASTCKPT_CAST(U8, uint8_t, I64, int64_t),
    FASTCKPT_CAST(U8, uint8_t, U16, uint16_t),
    FASTCKPT_CAST(U8, uint8_t, U32, uint32_t),
    FASTCKPT_CAST(U8, uint8_t, U64, uint64_t),
    FASTCKPT_CAST(U16, uint16_t, I32, int32_t),
    FASTCKPT_CAST(U16, uint16_t, I64, int64_t),
    FASTCKPT_CAST(U16, uint16_t, U32, uint32_t),
    FASTCKPT_CAST(U16, uint16_t, U64, uint64_t),
    FASTCKPT_CAST(U32, uint32_t, I64, int64_t),
    FASTCKPT_CAST(U32, uint32_t, U64, uint64_t),
    {DType::C32, DType::C64, &complex_kernel<Half, float>},
    {DType::C64, DType::C32, &complex_kernel<float, Half>},
    {DType::C32, DType::C128, &complex_kernel<Half, double>},
    {DType::C128, DType::C32, &complex_kernel<double, Half>},
    {DType::C64, DType::C128, &complex_kernel<float, double>},
    {DType::C128, DType::C64, &complex_kernel<double, float>},
};

#undef FASTCKPT_CAST

}  // namespace

uint16_t float_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffff;  // torch's vector kernels' NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_float(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// After F. Giesen's float_to_half_fast3_rtne: exact round-to-nearest-even,
// subnormals through an FP add, overflow to inf, NaN to a quiet NaN.
uint16_t float_to_half(float f) {
  const uint32_t f32_infinity = 255u << 23;
  const uint32_t f16_overflow = (127u + 16u) << 23;  // 2^16: rounds to inf
  const uint32_t denorm_magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t u = bits_of(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t out;
  if (u >= f16_overflow) {
    // NaN: quiet, the payload's top bits kept (F16C's vcvtps2ph, torch's kernel).
    out = u > f32_infinity ? 0x7e00u | ((u >> 13) & 0x3ffu) : 0x7c00u;
  } else if (u < (113u << 23)) {
    // Below the smallest normal half: the FP add aligns and rounds the mantissa.
    const float magic = float_of(denorm_magic_bits);
    out = bits_of(float_of(u) + magic) - denorm_magic_bits;
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += ((15u - 127u) << 23) + 0xfffu;  // rebias exponent, rounding bias
    u += mantissa_odd;
    out = u >> 13;
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / NaN
    if ((h & 0x3ffu) != 0) o |= 0x400000u;  // NaN: quiet, as F16C's vcvtph2ps (torch's kernel)
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalise with an FP subtract
    o = bits_of(float_of(o) - float_of(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return float_of(o);
}

float fp8_to_float(DType format, uint8_t v) { return decode_fp8(format, v); }

uint8_t float_to_fp8(DType format, float f) {
  switch (format) {
    case DType::F8_E4M3: return encode_fp8<DType::F8_E4M3>(f);
    case DType::F8_E5M2: return encode_fp8<DType::F8_E5M2>(f);
    case DType::F8_E4M3FNUZ: return encode_fp8<DType::F8_E4M3FNUZ>(f);
    case DType::F8_E5M2FNUZ: return encode_fp8<DType::F8_E5M2FNUZ>(f);
    case DType::F8_E8M0: return encode_fp8<DType::F8_E8M0>(f);
    default: return 0;
  }
}

const char* cast_kernel_set() {
  switch (best_kernels()) {
    case CastKernels::Avx512: return "avx512";
    case CastKernels::Avx2: return "avx2+f16c";
    default: return "portable";
  }
}

bool cast_kernels_available(CastKernels set) {
  switch (set) {
    case CastKernels::Avx512: return simd::avx512::available();
    case CastKernels::Avx2: return simd::avx2::available();
    default: return true;
  }
}

std::optional<CastFn> find_cast(DType from, DType to, CastKernels set) {
  if (from == to) {
    switch (dtype_itemsize(from)) {
      case 1: return &copy_kernel<1>;
      case 2: return &copy_kernel<2>;
      case 4: return &copy_kernel<4>;
      case 8: return &copy_kernel<8>;
      case 16: return &copy_kernel<16>;
      default: return std::nullopt;
    }
  }
  if (CastFn fn = vector_kernel(from, to, set, /*streaming=*/false)) return fn;
  if (CastFn fn = portable_float_cast(from, to)) return fn;
  for (const auto& c : kOtherCasts)
    if (c.from == from && c.to == to) return c.fn;
  return std::nullopt;
}

std::optional<CastFn> find_streaming_cast(DType from, DType to, CastKernels set) {
  if (CastFn fn = vector_kernel(from, to, set, /*streaming=*/true)) return fn;
  return std::nullopt;
}

std::string unsupported_cast_text(DType from, DType to) {
  return "cannot cast " + std::string(dtype_name(from)) + " to " + std::string(dtype_name(to)) +
         " (supported: every floating type (F64, F32, F16, BF16, F8_*) to every other, complex"
         " widths among each other and widening integer casts)";
}

}  // namespace fastckpt
