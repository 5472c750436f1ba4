// Element types the core understands, with the names used by safetensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace fastckpt {

enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  I16,
  I32,
  I64,
  U16,
  U32,
  U64,
  F16,
  BF16,
  F32,
  F64,
  F8_E4M3,
  F8_E5M2,
  C64,
  C128,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  F8_E8M0,
  // torch.float4_e2m1fn_x2: two e2m1 values packed in one byte. safetensors
  // calls it "F4" and counts the halves in its shapes; readers convert.
  F4_X2,
  C32,  // torch.complex32: a float16 real and imaginary part
  // torch's raw bit containers (bits8, bits16, bits1x8, bits2x4, bits4x2):
  // readable and copyable, never converted.
  BITS8,
  BITS16,
  BITS1x8,
  BITS2x4,
  BITS4x2,
};

inline constexpr int kNumDTypes = 27;

size_t dtype_itemsize(DType t);
// safetensors spelling: "F32", "BF16", "F8_E4M3", ...; types safetensors has no
// name for get one in the same style ("F4_X2", "C32", "BITS8").
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
// torch storage class names as pickled by torch.save: "FloatStorage", ... The
// quantized classes (QUInt8Storage, ...) give their integer representation.
std::optional<DType> dtype_from_storage_class(std::string_view name);
// "quint8" for QUInt8Storage, ...; nullopt for other classes.
std::optional<std::string_view> quantized_storage_class(std::string_view name);

}  // namespace fastckpt
