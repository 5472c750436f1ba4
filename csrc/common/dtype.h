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
};

inline constexpr int kNumDTypes = 17;

size_t dtype_itemsize(DType t);
// safetensors spelling: "F32", "BF16", "F8_E4M3", ...
std::string_view dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
// torch storage class names as pickled by torch.save: "FloatStorage", ...
std::optional<DType> dtype_from_storage_class(std::string_view name);

}  // namespace fastckpt
