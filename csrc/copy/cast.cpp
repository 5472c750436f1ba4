#include "copy/cast.h"

#include <cstring>
#include <type_traits>

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

// Storage-only wrappers so templates can tell the 16-bit float formats apart.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, Half>) {
    return half_to_float(v.bits);
  } else if constexpr (std::is_same_v<T, BFloat16>) {
    return bf16_to_float(v.bits);
  } else {
    return static_cast<float>(v);
  }
}

template <typename From, typename To>
To convert(From v) {
  if constexpr (std::is_same_v<To, Half>) {
    return Half{float_to_half(to_float(v))};  // fp64 rounds to fp32 first, as torch does
  } else if constexpr (std::is_same_v<To, BFloat16>) {
    return BFloat16{float_to_bf16(to_float(v))};
  } else if constexpr (std::is_same_v<From, Half> || std::is_same_v<From, BFloat16>) {
    return static_cast<To>(to_float(v));
  } else {
    return static_cast<To>(v);
  }
}

template <typename From, typename To>
void cast_kernel(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const From*>(src);
  auto* out = static_cast<To*>(dst);
  for (size_t i = 0; i < n; ++i) out[i] = convert<From, To>(in[i]);
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

#define FASTCKPT_CAST(F, TF, T, TT) {DType::F, DType::T, &cast_kernel<TF, TT>}

// Float casts torch users meet when a checkpoint's precision differs from the
// model's, and lossless integer widening. Anything else is refused by name.
const CastEntry kCasts[] = {
    FASTCKPT_CAST(F32, float, BF16, BFloat16),
    FASTCKPT_CAST(BF16, BFloat16, F32, float),
    FASTCKPT_CAST(F32, float, F16, Half),
    FASTCKPT_CAST(F16, Half, F32, float),
    FASTCKPT_CAST(F16, Half, BF16, BFloat16),
    FASTCKPT_CAST(BF16, BFloat16, F16, Half),
    FASTCKPT_CAST(F64, double, F32, float),
    FASTCKPT_CAST(F64, double, F16, Half),
    FASTCKPT_CAST(F64, double, BF16, BFloat16),
    FASTCKPT_CAST(F32, float, F64, double),
    FASTCKPT_CAST(F16, Half, F64, double),
    FASTCKPT_CAST(BF16, BFloat16, F64, double),
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
};

#undef FASTCKPT_CAST

}  // namespace

uint16_t float_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);  // NaN: keep sign, force quiet
  }
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
    out = u > f32_infinity ? 0x7e00u : 0x7c00u;
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
  } else if (exp == 0) {
    o += 1u << 23;  // zero / subnormal: renormalise with an FP subtract
    o = bits_of(float_of(o) - float_of(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return float_of(o);
}

std::optional<CastFn> find_cast(DType from, DType to) {
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
  for (const auto& c : kCasts)
    if (c.from == from && c.to == to) return c.fn;
  return std::nullopt;
}

std::string unsupported_cast_text(DType from, DType to) {
  return "cannot cast " + std::string(dtype_name(from)) + " to " + std::string(dtype_name(to)) +
         " (supported: F32/F16/BF16/F64 among each other and widening integer casts)";
}

}  // namespace fastckpt
