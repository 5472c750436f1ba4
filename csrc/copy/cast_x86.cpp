#include "copy/cast_simd.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define FASTCKPT_X86 1
#endif

namespace fastckpt::simd::avx2 {

#ifdef FASTCKPT_X86
namespace {

#define FASTCKPT_AVX2 __attribute__((target("avx2,f16c")))

// Eight fp32 values rounded to bf16 (nearest, ties to even; NaN to `nan`, which
// differs by source type: copy/cast.h), in the low 16 bits of each 32-bit lane.
FASTCKPT_AVX2 inline __m256i f32x8_to_bf16_lanes(__m256i u, int nan = 0xffff) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(nan), is_nan);
}

// Stream: non-temporal stores, for destinations nobody reads soon (a model's
// weights being loaded): they skip reading the destination's lines into the
// cache first. Their addresses must be aligned (see aligned_head()).
template <bool Stream>
FASTCKPT_AVX2 inline void store256(void* p, __m256i v) {
  if constexpr (Stream) _mm256_stream_si256(static_cast<__m256i*>(p), v);
  else _mm256_storeu_si256(static_cast<__m256i*>(p), v);
}
template <bool Stream>
FASTCKPT_AVX2 inline void store128(void* p, __m128i v) {
  if constexpr (Stream) _mm_stream_si128(static_cast<__m128i*>(p), v);
  else _mm_storeu_si128(static_cast<__m128i*>(p), v);
}

// Elements to convert one by one before out + i is 32-byte aligned (all when n is smaller).
template <bool Stream, typename T>
size_t aligned_head(const T* out, size_t n) {
  if constexpr (!Stream) return 0;
  const auto misaligned = reinterpret_cast<uintptr_t>(out) & 31u;
  if (misaligned == 0) return 0;
  if (misaligned % sizeof(T) != 0) return n;  // never 32-byte aligned: all scalar
  const size_t head = (32 - misaligned) / sizeof(T);
  return head < n ? head : n;
}

template <bool Stream>
FASTCKPT_AVX2 inline void fence() {
  if constexpr (Stream) _mm_sfence();
}

// Two groups of eight 16-bit lanes packed into sixteen consecutive values.
template <bool Stream = false>
FASTCKPT_AVX2 inline void store_u16x16(uint16_t* out, __m256i lo, __m256i hi) {
  const __m256i packed = _mm256_packus_epi32(lo, hi);  // lanes: lo0 hi0 lo1 hi1
  store256<Stream>(out, _mm256_permute4x64_epi64(packed, 0xD8));
}

template <bool Stream>
FASTCKPT_AVX2 void bf16_to_f32(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<float*>(dst);
  size_t i = 0;
  for (const size_t head = aligned_head<Stream>(out, n); i < head; ++i) out[i] = bf16_to_float(in[i]);
  for (; i + 16 <= n; i += 16) {  // the bits move up by 16
    const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i + 8)));
    store256<Stream>(out + i, _mm256_slli_epi32(a, 16));
    store256<Stream>(out + i + 8, _mm256_slli_epi32(b, 16));
  }
  for (; i < n; ++i) out[i] = bf16_to_float(in[i]);
  fence<Stream>();
}

template <bool Stream>
FASTCKPT_AVX2 void f16_to_f32(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<float*>(dst);
  size_t i = 0;
  for (const size_t head = aligned_head<Stream>(out, n); i < head; ++i) out[i] = half_to_float(in[i]);
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i + 8)));
    store256<Stream>(out + i, _mm256_castps_si256(a));
    store256<Stream>(out + i + 8, _mm256_castps_si256(b));
  }
  for (; i < n; ++i) out[i] = half_to_float(in[i]);
  fence<Stream>();
}

template <bool Stream>
FASTCKPT_AVX2 void f32_to_bf16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const float*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (const size_t head = aligned_head<Stream>(out, n); i < head; ++i) out[i] = float_to_bf16(in[i]);
  for (; i + 16 <= n; i += 16) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + 8));
    store_u16x16<Stream>(out + i, f32x8_to_bf16_lanes(a), f32x8_to_bf16_lanes(b));
  }
  for (; i < n; ++i) out[i] = float_to_bf16(in[i]);
  fence<Stream>();
}

template <bool Stream>
FASTCKPT_AVX2 void f32_to_f16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const float*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (const size_t head = aligned_head<Stream>(out, n); i < head; ++i) out[i] = float_to_half(in[i]);
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store128<Stream>(out + i, h);
  }
  for (; i < n; ++i) out[i] = float_to_half(in[i]);
  fence<Stream>();
}

FASTCKPT_AVX2 void f16_to_bf16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i + 8)));
    store_u16x16(out + i, f32x8_to_bf16_lanes(_mm256_castps_si256(a), 0x7fc0),
                 f32x8_to_bf16_lanes(_mm256_castps_si256(b), 0x7fc0));
  }
  for (; i < n; ++i) {
    const float f = half_to_float(in[i]);
    out[i] = f != f ? uint16_t{0x7fc0} : float_to_bf16(f);
  }
}

FASTCKPT_AVX2 void bf16_to_f16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))), 16);
    const __m128i h = _mm256_cvtps_ph(_mm256_castsi256_ps(w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
  for (; i < n; ++i) out[i] = float_to_half(bf16_to_float(in[i]));
}

// Eight bytes of an 8-bit float format widened to their exact fp32 values
// (every fp8 value is an fp32, bf16 and, but for e8m0's extremes, fp16 value).
// The sign/exponent/mantissa formats: the bits, placed where fp32 keeps its
// exponent and mantissa, read as an fp32 and scaled by 2^(127 - bias); the
// subnormals from their mantissa as an integer. NaN and inf codes are patched after.
template <DType K>
FASTCKPT_AVX2 inline __m256i fp8x8_to_f32_bits(const uint8_t* in) {
  uint64_t raw;
  std::memcpy(&raw, in, 8);
  const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(raw)));
  const __m256i c10_nan = _mm256_set1_epi32(0x7f800001);  // c10's NaN of e8m0 and the fnuz formats
  if constexpr (K == DType::F8_E8M0) {
    // 2^(v - 127): v is the fp32 exponent field; 0 is 2^-127 (an fp32 subnormal), 255 NaN.
    __m256i r = _mm256_slli_epi32(v, 23);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x00400000), _mm256_cmpeq_epi32(v, _mm256_setzero_si256()));
    return _mm256_blendv_epi8(r, c10_nan, _mm256_cmpeq_epi32(v, _mm256_set1_epi32(0xff)));
  } else {
    constexpr int m = K == DType::F8_E4M3 || K == DType::F8_E4M3FNUZ ? 3 : 2;
    constexpr int bias = K == DType::F8_E4M3 ? 7 : K == DType::F8_E5M2 ? 15 : K == DType::F8_E4M3FNUZ ? 8 : 16;
    const __m256i magnitude = _mm256_and_si256(v, _mm256_set1_epi32(0x7f));
    const __m256 scale = _mm256_castsi256_ps(_mm256_set1_epi32((127 + 127 - bias) << 23));
    const __m256 normal = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(magnitude, 23 - m)), scale);
    // Exponent 0: mantissa * 2^(1 - bias - m), from an integer so that no fp32
    // subnormal is an operand (denormals-are-zero mode would flush it).
    const __m256 step = _mm256_castsi256_ps(_mm256_set1_epi32((127 + 1 - bias - m) << 23));
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), step);
    const __m256i is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(1 << m), magnitude);
    const __m256 value = _mm256_blendv_ps(normal, subnormal, _mm256_castsi256_ps(is_sub));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
    __m256i r = _mm256_or_si256(_mm256_castps_si256(value), sign);
    if constexpr (K == DType::F8_E4M3) {  // S.1111.111 is NaN (c10: sign | 0x7ff00000), no inf
      const __m256i nan = _mm256_or_si256(_mm256_set1_epi32(0x7ff00000), sign);
      r = _mm256_blendv_epi8(r, nan, _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7f)));
    } else if constexpr (K == DType::F8_E5M2) {
      // Exponent 31: inf (mantissa 0) or NaN, widened as fp16's (payload kept, quiet bit set).
      const __m256i top = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7b));
      const __m256i payload = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(3)), 21);
      const __m256i nan = _mm256_or_si256(_mm256_or_si256(_mm256_set1_epi32(0x7fc00000), payload), sign);
      const __m256i inf = _mm256_or_si256(_mm256_set1_epi32(0x7f800000), sign);
      const __m256i is_inf = _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7c));
      r = _mm256_blendv_epi8(r, _mm256_blendv_epi8(nan, inf, is_inf), top);
    } else {  // fnuz: 0x80 (what would be -0) is the NaN
      r = _mm256_blendv_epi8(r, c10_nan, _mm256_cmpeq_epi32(v, _mm256_set1_epi32(0x80)));
    }
    return r;
  }
}

template <DType K, bool Stream>
FASTCKPT_AVX2 void fp8_to_f32(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<float*>(dst);
  size_t i = 0;
  for (const size_t head = aligned_head<Stream>(out, n); i < head; ++i) out[i] = fp8_to_float(K, in[i]);
  for (; i + 8 <= n; i += 8) store256<Stream>(out + i, fp8x8_to_f32_bits<K>(in + i));
  for (; i < n; ++i) out[i] = fp8_to_float(K, in[i]);
  fence<Stream>();
}

// fp8 -> bf16 is exact: the fp32 value's top half; NaN is torch's 0x7fc0.
template <DType K>
FASTCKPT_AVX2 inline __m256i fp8x8_to_bf16_lanes(const uint8_t* in) {
  const __m256i bits = fp8x8_to_f32_bits<K>(in);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x7fc0), is_nan);
}

// Sixteen bytes of a sign/exponent/mantissa fp8 format to bf16, in 16-bit lanes.
// bf16 has fp32's exponent range, so a normal value's bits are the byte's
// exponent and mantissa shifted into place and rebiased: a shift and an add,
// where going through fp32 costs eight lanes at a time and a multiply. The 2^m
// subnormals come from a vpshufb table of their bf16 bits (`subnormals`, word k
// for magnitude k); NaN (0x7fc0, sign dropped, as c10 writes it) and inf after.
template <DType K>
FASTCKPT_AVX2 inline __m256i fp8x16_to_bf16(__m128i bytes, __m256i subnormals) {
  constexpr int m = K == DType::F8_E4M3 || K == DType::F8_E4M3FNUZ ? 3 : 2;
  constexpr int bias = K == DType::F8_E4M3 ? 7 : K == DType::F8_E5M2 ? 15 : K == DType::F8_E4M3FNUZ ? 8 : 16;
  const __m256i v = _mm256_cvtepu8_epi16(bytes);
  const __m256i magnitude = _mm256_and_si256(v, _mm256_set1_epi16(0x7f));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8);
  const __m256i normal =
      _mm256_add_epi16(_mm256_slli_epi16(magnitude, 7 - m), _mm256_set1_epi16(static_cast<short>((127 - bias) << 7)));
  // vpshufb index of word k: bytes 2k and 2k + 1.
  const __m256i index = _mm256_add_epi16(_mm256_mullo_epi16(magnitude, _mm256_set1_epi16(0x0202)), _mm256_set1_epi16(0x0100));
  const __m256i is_sub = _mm256_cmpgt_epi16(_mm256_set1_epi16(1 << m), magnitude);
  __m256i r = _mm256_blendv_epi8(normal, _mm256_shuffle_epi8(subnormals, index), is_sub);
  r = _mm256_or_si256(r, sign);
  const __m256i nan = _mm256_set1_epi16(0x7fc0);
  if constexpr (K == DType::F8_E4M3) {  // S.1111.111 is NaN, no inf
    r = _mm256_blendv_epi8(r, nan, _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7f)));
  } else if constexpr (K == DType::F8_E5M2) {  // exponent 31: inf (mantissa 0) or NaN
    const __m256i inf = _mm256_or_si256(_mm256_set1_epi16(0x7f80), sign);
    r = _mm256_blendv_epi8(r, inf, _mm256_cmpeq_epi16(magnitude, _mm256_set1_epi16(0x7c)));
    r = _mm256_blendv_epi8(r, nan, _mm256_cmpgt_epi16(magnitude, _mm256_set1_epi16(0x7c)));
  } else {  // fnuz: 0x80 (what would be -0) is the NaN
    r = _mm256_blendv_epi8(r, nan, _mm256_cmpeq_epi16(v, _mm256_set1_epi16(0x80)));
  }
  return r;
}

// The subnormals' bf16 bits (magnitudes 0 to 2^m - 1) from the portable kernel,
// in both 128-bit lanes for vpshufb.
template <DType K>
FASTCKPT_AVX2 inline __m256i fp8_subnormal_table(CastFn portable) {
  alignas(16) uint8_t bytes[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  alignas(16) uint16_t words[8] = {};
  portable(bytes, words, 8);
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(words)));
}

template <DType K, bool Stream>
FASTCKPT_AVX2 void fp8_to_bf16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  const CastFn scalar = *find_cast(K, DType::BF16, CastKernels::Portable);
  if (const size_t head = aligned_head<Stream>(out, n); head > 0) {
    scalar(in, out, head);
    i = head;
  }
  if constexpr (K == DType::F8_E8M0) {
    for (; i + 16 <= n; i += 16)
      store_u16x16<Stream>(out + i, fp8x8_to_bf16_lanes<K>(in + i), fp8x8_to_bf16_lanes<K>(in + i + 8));
  } else {
    const __m256i subnormals = fp8_subnormal_table<K>(scalar);
    for (; i + 16 <= n; i += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      store256<Stream>(out + i, fp8x16_to_bf16<K>(bytes, subnormals));
    }
  }
  if (i < n) scalar(in + i, out + i, n - i);
  fence<Stream>();
}

template <DType K>
FASTCKPT_AVX2 void fp8_to_f16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_castsi256_ps(fp8x8_to_f32_bits<K>(in + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) out[i] = float_to_half(fp8_to_float(K, in[i]));
}

template <DType K, bool Stream = false>
CastFn fp8_kernel_to(DType to) {
  if (to == DType::F32) return &fp8_to_f32<K, Stream>;
  if (to == DType::BF16) return &fp8_to_bf16<K, Stream>;
  if (to == DType::F16 && !Stream) return &fp8_to_f16<K>;
  return nullptr;
}

CastFn fp8_kernel(DType from, DType to, bool stream) {
  switch (from) {
    case DType::F8_E4M3: return stream ? fp8_kernel_to<DType::F8_E4M3, true>(to) : fp8_kernel_to<DType::F8_E4M3>(to);
    case DType::F8_E5M2: return stream ? fp8_kernel_to<DType::F8_E5M2, true>(to) : fp8_kernel_to<DType::F8_E5M2>(to);
    case DType::F8_E4M3FNUZ:
      return stream ? fp8_kernel_to<DType::F8_E4M3FNUZ, true>(to) : fp8_kernel_to<DType::F8_E4M3FNUZ>(to);
    case DType::F8_E5M2FNUZ:
      return stream ? fp8_kernel_to<DType::F8_E5M2FNUZ, true>(to) : fp8_kernel_to<DType::F8_E5M2FNUZ>(to);
    case DType::F8_E8M0: return stream ? fp8_kernel_to<DType::F8_E8M0, true>(to) : fp8_kernel_to<DType::F8_E8M0>(to);
    default: return nullptr;
  }
}

}  // namespace

// F16C is read from CPUID leaf 1 directly: clang's __builtin_cpu_supports does
// not know "f16c" (gcc's does). AVX2 support implies the OS saves the YMM state.
bool available() {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
    return f16c && __builtin_cpu_supports("avx2");
  }();
  return ok;
}

CastFn find(DType from, DType to) {
  if (from == DType::BF16 && to == DType::F32) return &bf16_to_f32<false>;
  if (from == DType::F16 && to == DType::F32) return &f16_to_f32<false>;
  if (from == DType::F32 && to == DType::BF16) return &f32_to_bf16<false>;
  if (from == DType::F32 && to == DType::F16) return &f32_to_f16<false>;
  if (from == DType::F16 && to == DType::BF16) return &f16_to_bf16;
  if (from == DType::BF16 && to == DType::F16) return &bf16_to_f16;
  return fp8_kernel(from, to, /*stream=*/false);
}

CastFn find_streaming(DType from, DType to) {
  if (from == DType::BF16 && to == DType::F32) return &bf16_to_f32<true>;
  if (from == DType::F16 && to == DType::F32) return &f16_to_f32<true>;
  if (from == DType::F32 && to == DType::BF16) return &f32_to_bf16<true>;
  if (from == DType::F32 && to == DType::F16) return &f32_to_f16<true>;
  return fp8_kernel(from, to, /*stream=*/true);
}

#else  // not x86: the portable kernels only

bool available() { return false; }
CastFn find(DType, DType) { return nullptr; }
CastFn find_streaming(DType, DType) { return nullptr; }

#endif

}  // namespace fastckpt::simd::avx2
