// AVX-512 cast kernels (copy/cast_simd.h): 64 bytes a store where AVX2 does 32,
// fp32 -> bf16 with AVX512-BF16's vcvtne2ps2bf16 where the CPU has it, and the
// 8-bit formats to 16 bits by table lookup. Heads (up to the first 64-byte
// aligned store) and tails run the portable kernel, so every element's bits are
// the portable kernels' (tests compare all three sets with Tensor.to()).
#include <array>
#include <cstdint>

#include "copy/cast_simd.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

// GCC 12's AVX-512 intrinsics start from `__m512i __Y = __Y;`
// (_mm512_undefined_epi32), which -Wmaybe-uninitialized reports wherever they
// are inlined (GCC bug 105593): for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace fastckpt::simd::avx512 {

#if defined(__x86_64__)
namespace {

#define FASTCKPT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define FASTCKPT_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// AVX512-BF16: CPUID leaf 7 sub-leaf 1, EAX bit 5 (read directly: not every
// compiler's __builtin_cpu_supports knows it).
bool has_bf16() {
  static const bool ok = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && (eax & (1u << 5)) != 0;
  }();
  return ok;
}

// Stream: non-temporal stores for destinations nobody reads soon; their
// addresses must be 64-byte aligned (head_elements()).
template <bool Stream>
FASTCKPT_AVX512 inline void store512(void* p, __m512i v) {
  if constexpr (Stream) _mm512_stream_si512(static_cast<__m512i*>(p), v);
  else _mm512_storeu_si512(p, v);
}

// Elements to convert before out + i is 64-byte aligned (all of them when that
// never happens or n is smaller); none without streaming stores.
template <bool Stream, typename T>
size_t head_elements(const T* out, size_t n) {
  if constexpr (!Stream) return 0;
  const auto misaligned = reinterpret_cast<uintptr_t>(out) & 63u;
  if (misaligned == 0) return 0;
  if (misaligned % sizeof(T) != 0) return n;
  const size_t head = (64 - misaligned) / sizeof(T);
  return head < n ? head : n;
}

// Runs `body(i)` for each whole block of Block elements between a portable head
// and tail; the portable kernel gives head and tail the same bits.
template <bool Stream, size_t Block, typename In, typename Out, typename Body>
FASTCKPT_AVX512 inline void blocks(DType from, DType to, const In* in, Out* out, size_t n, Body body) {
  const CastFn portable = *find_cast(from, to, CastKernels::Portable);
  const size_t head = head_elements<Stream>(out, n);
  if (head > 0) portable(in, out, head);
  size_t i = head;
  for (; i + Block <= n; i += Block) body(i);
  if (i < n) portable(in + i, out + i, n - i);
  if constexpr (Stream) _mm_sfence();
}

template <bool Stream>
FASTCKPT_AVX512 void bf16_to_f32(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<float*>(dst);
  blocks<Stream, 16>(DType::BF16, DType::F32, in, out, n, [&](size_t i) FASTCKPT_AVX512 {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
    store512<Stream>(out + i, _mm512_slli_epi32(w, 16));  // bf16 is fp32's top half
  });
}

template <bool Stream>
FASTCKPT_AVX512 void f16_to_f32(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const uint16_t*>(src);
  auto* out = static_cast<float*>(dst);
  blocks<Stream, 16>(DType::F16, DType::F32, in, out, n, [&](size_t i) FASTCKPT_AVX512 {
    const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
    store512<Stream>(out + i, _mm512_castps_si512(f));
  });
}

template <bool Stream>
FASTCKPT_AVX512 void f32_to_f16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const float*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  blocks<Stream, 32>(DType::F32, DType::F16, in, out, n, [&](size_t i) FASTCKPT_AVX512 {
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m256i lo = _mm512_cvtps_ph(_mm512_loadu_ps(in + i), kRound);
    const __m256i hi = _mm512_cvtps_ph(_mm512_loadu_ps(in + i + 16), kRound);
    store512<Stream>(out + i, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
  });
}

// Sixteen fp32 values rounded to bf16 in integer arithmetic (nearest, ties to
// even; NaN to 0xffff as torch's vector kernels), packed into 16 halves.
FASTCKPT_AVX512 inline __m256i f32x16_to_bf16(__m512i u) {
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0xffff)));
}

FASTCKPT_AVX512 inline __m512i f32x32_to_bf16(const float* in) {
  const __m256i lo = f32x16_to_bf16(_mm512_loadu_si512(in));
  const __m256i hi = f32x16_to_bf16(_mm512_loadu_si512(in + 16));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

template <bool Stream>
FASTCKPT_AVX512 void f32_to_bf16(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const float*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  blocks<Stream, 32>(DType::F32, DType::BF16, in, out, n,
                     [&](size_t i) FASTCKPT_AVX512 { store512<Stream>(out + i, f32x32_to_bf16(in + i)); });
}

// vcvtne2ps2bf16 rounds to nearest even like torch, but treats fp32 subnormal
// inputs as zero and keeps NaN payloads ((bits >> 16) | 0x40, sign kept) where
// torch writes 0xffff: a block holding either (vfpclassps: QNaN 0x01, SNaN
// 0x80, denormal 0x20) is redone in integer arithmetic. Real weights rarely
// have any, so the fix-up costs one class test per 16 values.
template <bool Stream>
FASTCKPT_AVX512_BF16 void f32_to_bf16_ne(const void* src, void* dst, size_t n) {
  const auto* in = static_cast<const float*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  blocks<Stream, 32>(DType::F32, DType::BF16, in, out, n, [&](size_t i) FASTCKPT_AVX512_BF16 {
    const __m512 lo = _mm512_loadu_ps(in + i);
    const __m512 hi = _mm512_loadu_ps(in + i + 16);
    constexpr int kNanOrSubnormal = 0x01 | 0x80 | 0x20;
    const __mmask16 odd = _mm512_fpclass_ps_mask(lo, kNanOrSubnormal) | _mm512_fpclass_ps_mask(hi, kNanOrSubnormal);
    const __m512i v = odd != 0 ? f32x32_to_bf16(in + i) : (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    store512<Stream>(out + i, v);
  });
}

// An 8-bit format's 256 results as 16-bit values (bf16 or fp16), taken from the
// portable kernel so the lookup cannot differ from it.
struct ByteTable {
  alignas(64) std::array<uint16_t, 256> values;
  ByteTable(DType from, DType to) {
    std::array<uint8_t, 256> bytes;
    for (size_t b = 0; b < 256; ++b) bytes[b] = static_cast<uint8_t>(b);
    (*find_cast(from, to, CastKernels::Portable))(bytes.data(), values.data(), 256);
  }
};

// The table in eight registers; vpermi2w picks among 64 entries (index bits
// 0-5) of two of them, bits 6 and 7 choose among the four results.
template <DType From, DType To, bool Stream>
FASTCKPT_AVX512 void byte_table_cast(const void* src, void* dst, size_t n) {
  static const ByteTable table(From, To);
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint16_t*>(dst);
  __m512i t[8];
  for (int k = 0; k < 8; ++k) t[k] = _mm512_load_si512(table.values.data() + 32 * k);
  blocks<Stream, 32>(From, To, in, out, n, [&](size_t i) FASTCKPT_AVX512 {
    const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)));
    const __m512i r0 = _mm512_permutex2var_epi16(t[0], idx, t[1]);
    const __m512i r1 = _mm512_permutex2var_epi16(t[2], idx, t[3]);
    const __m512i r2 = _mm512_permutex2var_epi16(t[4], idx, t[5]);
    const __m512i r3 = _mm512_permutex2var_epi16(t[6], idx, t[7]);
    const __mmask32 bit6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x40));
    const __mmask32 bit7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x80));
    const __m512i low = _mm512_mask_blend_epi16(bit6, r0, r1);
    const __m512i high = _mm512_mask_blend_epi16(bit6, r2, r3);
    store512<Stream>(out + i, _mm512_mask_blend_epi16(bit7, low, high));
  });
}

template <DType From, bool Stream>
CastFn byte_table_to(DType to) {
  if (to == DType::BF16) return &byte_table_cast<From, DType::BF16, Stream>;
  if (to == DType::F16) return &byte_table_cast<From, DType::F16, Stream>;
  return nullptr;
}

template <bool Stream>
CastFn find_kernel(DType from, DType to) {
  if (from == DType::BF16 && to == DType::F32) return &bf16_to_f32<Stream>;
  if (from == DType::F16 && to == DType::F32) return &f16_to_f32<Stream>;
  if (from == DType::F32 && to == DType::F16) return &f32_to_f16<Stream>;
  if (from == DType::F32 && to == DType::BF16) return has_bf16() ? &f32_to_bf16_ne<Stream> : &f32_to_bf16<Stream>;
  switch (from) {
    case DType::F8_E4M3: return byte_table_to<DType::F8_E4M3, Stream>(to);
    case DType::F8_E5M2: return byte_table_to<DType::F8_E5M2, Stream>(to);
    case DType::F8_E4M3FNUZ: return byte_table_to<DType::F8_E4M3FNUZ, Stream>(to);
    case DType::F8_E5M2FNUZ: return byte_table_to<DType::F8_E5M2FNUZ, Stream>(to);
    case DType::F8_E8M0: return byte_table_to<DType::F8_E8M0, Stream>(to);
    default: return nullptr;
  }
}

}  // namespace

// __builtin_cpu_supports checks that the OS saves the ZMM and mask registers too.
bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

CastFn find(DType from, DType to) { return find_kernel<false>(from, to); }
CastFn find_streaming(DType from, DType to) { return find_kernel<true>(from, to); }

#else  // not x86-64

bool available() { return false; }
CastFn find(DType, DType) { return nullptr; }
CastFn find_streaming(DType, DType) { return nullptr; }

#endif

}  // namespace fastckpt::simd::avx512
