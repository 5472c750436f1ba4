// Tests of the cast kernels (copy/cast.h) against a scalar reference written
// here from the formats' definitions (double arithmetic, nearbyint's
// round-half-even), independent of cast.cpp's bit tricks: every fp16 and every
// bf16 bit pattern, the ties and near-ties between neighbours, random fp32
// values, through the kernels of every set the CPU runs (AVX-512, AVX2,
// portable), the streaming kernels, and the scalar functions. Starting offsets
// and lengths that are not multiples of a vector width exercise the tails.
#include "copy/cast.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

namespace {

// An IEEE-style binary format: 1 sign bit, E exponent bits, M mantissa bits.
struct Format {
  int e, m;
  const char* name;
  int bias() const { return (1 << (e - 1)) - 1; }
};
constexpr Format kHalf{5, 10, "F16"};
constexpr Format kBf16{8, 7, "BF16"};

double ref_decode(Format f, uint32_t bits) {
  const uint32_t mant = bits & ((1u << f.m) - 1);
  const uint32_t exp = (bits >> f.m) & ((1u << f.e) - 1);
  const double sign = (bits >> (f.e + f.m)) & 1u ? -1.0 : 1.0;
  if (exp == (1u << f.e) - 1) return mant ? std::nan("") : sign * INFINITY;
  if (exp == 0) return sign * std::ldexp(mant, 1 - f.bias() - f.m);
  return sign * std::ldexp(mant + (1u << f.m), static_cast<int>(exp) - f.bias() - f.m);
}

// x rounded to the nearest value of the format, ties to even; past the largest
// finite value (by half an ulp or more): infinity. NaN: the format's quiet NaN.
uint32_t ref_encode(Format f, double x) {
  const uint32_t sign = std::signbit(x) ? 1u << (f.e + f.m) : 0u;
  const uint32_t inf = ((1u << f.e) - 1) << f.m;
  if (std::isnan(x)) return inf | (1u << (f.m - 1));
  const double a = std::fabs(x);
  const int emin = 1 - f.bias();
  const int e = a == 0 ? emin : std::max(std::ilogb(a), emin);
  const double ulp = std::ldexp(1.0, e - f.m);
  const double v = std::nearbyint(a / ulp) * ulp;  // exact: a / ulp scales by a power of two
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -f.m), f.bias());
  if (std::isinf(a) || v > max_finite) return sign | inf;
  if (v < std::ldexp(1.0, emin)) return sign | static_cast<uint32_t>(v / std::ldexp(1.0, emin - f.m));
  const int ve = std::ilogb(v);
  const auto mant = static_cast<uint32_t>(v / std::ldexp(1.0, ve - f.m)) - (1u << f.m);
  return sign | (static_cast<uint32_t>(ve + f.bias()) << f.m) | mant;
}

bool is_nan_bits(Format f, uint32_t bits) {
  const uint32_t inf = ((1u << f.e) - 1) << f.m;
  return (bits & inf) == inf && (bits & ((1u << f.m) - 1)) != 0;
}

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Equal bits, or both NaN (NaN payloads and signs are not promised).
bool same_float(float got, double want) {
  return std::isnan(want) ? std::isnan(got) : bits_of(got) == bits_of(static_cast<float>(want));
}

// Runs `fn` over `in` whole and over in[off:] for a few odd offsets (unaligned
// starts, lengths that leave a tail), so every element is converted several
// ways; `check(i, out)` compares element i. Returns the number of mismatches.
template <class In, class Out, class Check>
int run_kernel(CastFn fn, const std::vector<In>& in, Check&& check, int report_first = 3) {
  int wrong = 0;
  for (size_t off : {size_t{0}, size_t{1}, size_t{7}}) {
    const size_t n = in.size() - off - (off ? 3 : 0);
    std::vector<Out> out(n + 1);
    fn(in.data() + off, out.data() + (off & 1), n);
    for (size_t i = 0; i < n; ++i) {
      if (!check(off + i, out[i + (off & 1)])) {
        if (wrong++ < report_first) std::printf("  mismatch at input %zu (offset %zu)\n", off + i, off);
      }
    }
  }
  return wrong;
}

// The kernels of every set this CPU runs, plain and streaming.
std::vector<CastFn> kernels(DType from, DType to) {
  std::vector<CastFn> out;
  for (CastKernels set : {CastKernels::Avx512, CastKernels::Avx2, CastKernels::Portable}) {
    if (!cast_kernels_available(set)) continue;
    if (auto fn = find_cast(from, to, set)) out.push_back(*fn);
    if (auto fn = find_streaming_cast(from, to, set)) out.push_back(*fn);
  }
  return out;
}

// Every bit pattern of a 16-bit format.
std::vector<uint16_t> all_patterns() {
  std::vector<uint16_t> v(65536);
  for (uint32_t i = 0; i < 65536; ++i) v[i] = static_cast<uint16_t>(i);
  return v;
}

// fp32 inputs that matter for rounding into `f`: its own values, the exact
// midpoints between neighbours (ties), the fp32 values just below and above
// each midpoint, the overflow boundary, and random fp32 bit patterns.
std::vector<float> rounding_inputs(Format f) {
  std::vector<float> v;
  for (uint32_t b = 0; b < (1u << (f.e + f.m)); ++b) {
    const double x = ref_decode(f, b), y = ref_decode(f, b + 1);
    if (std::isnan(x)) continue;
    v.push_back(static_cast<float>(x));
    v.push_back(-static_cast<float>(x));
    if (std::isinf(x) || std::isnan(y) || std::isinf(y)) continue;
    const auto mid = static_cast<float>((x + y) / 2);  // exact in fp32: one more bit than f
    for (float z : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      v.push_back(z);
      v.push_back(-z);
    }
  }
  // Beyond the largest finite value: the tie rounds to infinity (even), below it does not.
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -f.m), f.bias());
  const auto tie = static_cast<float>(max_finite + std::ldexp(1.0, f.bias() - f.m - 1));
  for (float z : {tie, std::nextafter(tie, 0.0f), std::nextafter(tie, INFINITY), INFINITY, -INFINITY,
                  std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::denorm_min(), 0.0f, -0.0f})
    v.push_back(z);
  std::mt19937 rng(3);
  for (int i = 0; i < 200000; ++i) v.push_back(float_of(static_cast<uint32_t>(rng())));
  return v;
}

}  // namespace

FASTCKPT_TEST(test_cast_16_bit_to_f32_every_pattern) {
  std::printf("  kernels: %s\n", cast_kernel_set());
  const std::vector<uint16_t> in = all_patterns();
  for (const auto& [dtype, fmt] : {std::pair{DType::F16, kHalf}, std::pair{DType::BF16, kBf16}}) {
    const Format f = fmt;
    int wrong = 0;
    for (CastFn fn : kernels(dtype, DType::F32))
      wrong += run_kernel<uint16_t, float>(fn, in, [&](size_t i, float got) { return same_float(got, ref_decode(f, in[i])); });
    auto to_double = find_cast(dtype, DType::F64);
    wrong += run_kernel<uint16_t, double>(*to_double, in, [&](size_t i, double got) {
      const double want = ref_decode(f, in[i]);
      return std::isnan(want) ? std::isnan(got) : std::memcmp(&got, &want, 8) == 0;
    });
    for (uint32_t i = 0; i < 65536; ++i) {
      const auto b = static_cast<uint16_t>(i);
      const float got = dtype == DType::F16 ? half_to_float(b) : bf16_to_float(b);
      wrong += !same_float(got, ref_decode(f, b));
    }
    expect(wrong == 0, std::string("every ") + f.name + " pattern to F32/F64 (kernels and scalar) equals the reference: " +
                           std::to_string(wrong) + " wrong");
  }
}

FASTCKPT_TEST(test_cast_f32_to_16_bit_rounds_to_nearest_even) {
  for (const auto& [dtype, fmt] : {std::pair{DType::F16, kHalf}, std::pair{DType::BF16, kBf16}}) {
    const Format f = fmt;
    const std::vector<float> in = rounding_inputs(f);
    auto check = [&](size_t i, uint16_t got) {
      const uint32_t want = ref_encode(f, in[i]);
      return is_nan_bits(f, want) ? is_nan_bits(f, got) : got == want;
    };
    int wrong = 0, n_kernels = 0;
    for (CastFn fn : kernels(DType::F32, dtype)) {
      wrong += run_kernel<float, uint16_t>(fn, in, check);
      ++n_kernels;
    }
    for (size_t i = 0; i < in.size(); ++i)
      wrong += !check(i, dtype == DType::F16 ? float_to_half(in[i]) : float_to_bf16(in[i]));
    expect(wrong == 0 && n_kernels >= 1,
           std::to_string(in.size()) + " F32 values (ties, near-ties, overflow, random) to " + f.name + " through " +
               std::to_string(n_kernels) + " kernel(s) and the scalar function: " + std::to_string(wrong) +
               " wrong");
  }
}

FASTCKPT_TEST(test_cast_between_f16_and_bf16_every_pattern) {
  const std::vector<uint16_t> in = all_patterns();
  for (const auto& [from, ffrom, to, fto] :
       {std::tuple{DType::F16, kHalf, DType::BF16, kBf16}, std::tuple{DType::BF16, kBf16, DType::F16, kHalf}}) {
    const Format a = ffrom, b = fto;
    int wrong = 0;
    for (CastFn fn : kernels(from, to))
      wrong += run_kernel<uint16_t, uint16_t>(fn, in, [&](size_t i, uint16_t got) {
        const uint32_t want = ref_encode(b, ref_decode(a, in[i]));
        return is_nan_bits(b, want) ? is_nan_bits(b, got) : got == want;
      });
    expect(wrong == 0, std::string("every ") + a.name + " pattern to " + b.name + " equals the reference: " +
                           std::to_string(wrong) + " wrong");
  }
}

// Every byte of each 8-bit format: decoding then encoding gives the byte back
// (NaNs stay NaN; the fnuz formats have no -0), and the F32 and BF16 kernels
// agree with the scalar decode.
FASTCKPT_TEST(test_cast_fp8_every_byte_round_trips) {
  for (DType k : {DType::F8_E4M3, DType::F8_E5M2, DType::F8_E4M3FNUZ, DType::F8_E5M2FNUZ, DType::F8_E8M0}) {
    std::vector<uint8_t> in(256);
    for (uint32_t i = 0; i < 256; ++i) in[i] = static_cast<uint8_t>(i);
    int wrong = 0;
    for (uint32_t i = 0; i < 256; ++i) {
      const float x = fp8_to_float(k, in[i]);
      const uint8_t back = float_to_fp8(k, x);
      wrong += std::isnan(x) ? !std::isnan(fp8_to_float(k, back)) : back != in[i];
    }
    for (CastFn fn : kernels(k, DType::F32))
      wrong += run_kernel<uint8_t, float>(fn, in, [&](size_t i, float got) {
        const float want = fp8_to_float(k, in[i]);
        return std::isnan(want) ? std::isnan(got) : bits_of(got) == bits_of(want);
      });
    // bf16 holds every fp8 value exactly: its top half of the fp32 value.
    for (CastFn fn : kernels(k, DType::BF16))
      wrong += run_kernel<uint8_t, uint16_t>(fn, in, [&](size_t i, uint16_t got) {
        const float want = fp8_to_float(k, in[i]);
        return std::isnan(want) ? is_nan_bits(kBf16, got) : got == bits_of(want) >> 16;
      });
    expect(wrong == 0, "every " + std::string(dtype_name(k)) + " byte round-trips and decodes alike: " +
                           std::to_string(wrong) + " wrong");
  }
}

FASTCKPT_TEST(test_cast_support) {
  expect(find_cast(DType::F32, DType::F32).has_value() && find_cast(DType::I8, DType::I64).has_value() &&
             find_cast(DType::C64, DType::C128).has_value(),
         "plain copies, integer widening and complex widths are supported");
  expect(!find_cast(DType::I64, DType::I8) && !find_cast(DType::F32, DType::I32) &&
             !find_cast(DType::C64, DType::F32),
         "narrowing integers, float to integer and complex to real are not");
  const std::string text = unsupported_cast_text(DType::C64, DType::F32);
  expect(contains(text, "cannot cast C64 to F32"), "the refusal names both dtypes: " + text);
  std::vector<int8_t> i8 = {-128, -1, 0, 1, 127};
  std::vector<int64_t> i64(5);
  (*find_cast(DType::I8, DType::I64))(i8.data(), i64.data(), 5);
  expect(i64 == std::vector<int64_t>{-128, -1, 0, 1, 127}, "I8 to I64 keeps the sign");
}
