#include "copy/cast_simd.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTCKPT_X86 1
#endif

namespace fastckpt::simd {

#ifdef FASTCKPT_X86
namespace {

#define FASTCKPT_AVX2 __attribute__((target("avx2,f16c")))

// Eight fp32 values rounded to bf16 (nearest, ties to even; NaN stays NaN),
// in the low 16 bits of each 32-bit lane.
FASTCKPT_AVX2 inline __m256i f32x8_to_bf16_lanes(__m256i u) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
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
    store_u16x16(out + i, f32x8_to_bf16_lanes(_mm256_castps_si256(a)),
                 f32x8_to_bf16_lanes(_mm256_castps_si256(b)));
  }
  for (; i < n; ++i) out[i] = float_to_bf16(half_to_float(in[i]));
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

}  // namespace

bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

const char* name() { return "avx2+f16c"; }

CastFn find(DType from, DType to) {
  if (from == DType::BF16 && to == DType::F32) return &bf16_to_f32<false>;
  if (from == DType::F16 && to == DType::F32) return &f16_to_f32<false>;
  if (from == DType::F32 && to == DType::BF16) return &f32_to_bf16<false>;
  if (from == DType::F32 && to == DType::F16) return &f32_to_f16<false>;
  if (from == DType::F16 && to == DType::BF16) return &f16_to_bf16;
  if (from == DType::BF16 && to == DType::F16) return &bf16_to_f16;
  return nullptr;
}

CastFn find_streaming(DType from, DType to) {
  if (from == DType::BF16 && to == DType::F32) return &bf16_to_f32<true>;
  if (from == DType::F16 && to == DType::F32) return &f16_to_f32<true>;
  if (from == DType::F32 && to == DType::BF16) return &f32_to_bf16<true>;
  if (from == DType::F32 && to == DType::F16) return &f32_to_f16<true>;
  return nullptr;
}

FASTCKPT_AVX2 void lookup_u32(const uint32_t* table, const uint8_t* in, uint32_t* out, size_t n) {
  size_t i = 0;
  const auto* base = reinterpret_cast<const int*>(table);
  for (; i + 8 <= n; i += 8) {
    uint64_t bytes;
    std::memcpy(&bytes, in + i, 8);
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(bytes)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_i32gather_epi32(base, idx, 4));
  }
  for (; i < n; ++i) out[i] = table[in[i]];
}

FASTCKPT_AVX2 void lookup_u16(const uint32_t* table, const uint8_t* in, uint16_t* out, size_t n) {
  size_t i = 0;
  const auto* base = reinterpret_cast<const int*>(table);
  for (; i + 16 <= n; i += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    const __m256i lo = _mm256_i32gather_epi32(base, _mm256_cvtepu8_epi32(bytes), 4);
    const __m256i hi = _mm256_i32gather_epi32(base, _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), 4);
    store_u16x16(out + i, lo, hi);
  }
  for (; i < n; ++i) out[i] = static_cast<uint16_t>(table[in[i]]);
}

#else  // not x86: the portable kernels only

bool available() { return false; }
const char* name() { return "portable"; }
CastFn find(DType, DType) { return nullptr; }
CastFn find_streaming(DType, DType) { return nullptr; }
void lookup_u32(const uint32_t* table, const uint8_t* in, uint32_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = table[in[i]];
}
void lookup_u16(const uint32_t* table, const uint8_t* in, uint16_t* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint16_t>(table[in[i]]);
}

#endif

}  // namespace fastckpt::simd
