#include "common/dtype.h"

#include <array>

namespace fastckpt {
namespace {

struct DTypeInfo {
  DType type;
  size_t itemsize;
  std::string_view name;
  std::string_view storage_class;  // empty: torch has no legacy storage class
};

constexpr std::array<DTypeInfo, kNumDTypes> kInfo = {{
    {DType::BOOL, 1, "BOOL", "BoolStorage"},
    {DType::U8, 1, "U8", "ByteStorage"},
    {DType::I8, 1, "I8", "CharStorage"},
    {DType::I16, 2, "I16", "ShortStorage"},
    {DType::I32, 4, "I32", "IntStorage"},
    {DType::I64, 8, "I64", "LongStorage"},
    {DType::U16, 2, "U16", "UInt16Storage"},
    {DType::U32, 4, "U32", "UInt32Storage"},
    {DType::U64, 8, "U64", "UInt64Storage"},
    {DType::F16, 2, "F16", "HalfStorage"},
    {DType::BF16, 2, "BF16", "BFloat16Storage"},
    {DType::F32, 4, "F32", "FloatStorage"},
    {DType::F64, 8, "F64", "DoubleStorage"},
    {DType::F8_E4M3, 1, "F8_E4M3", "Float8_e4m3fnStorage"},
    {DType::F8_E5M2, 1, "F8_E5M2", "Float8_e5m2Storage"},
    {DType::C64, 8, "C64", "ComplexFloatStorage"},
    {DType::C128, 16, "C128", "ComplexDoubleStorage"},
    {DType::F8_E4M3FNUZ, 1, "F8_E4M3FNUZ", ""},
    {DType::F8_E5M2FNUZ, 1, "F8_E5M2FNUZ", ""},
    {DType::F8_E8M0, 1, "F8_E8M0", ""},
    {DType::F4_X2, 1, "F4_X2", ""},
    {DType::C32, 4, "C32", "ComplexHalfStorage"},
    {DType::BITS8, 1, "BITS8", ""},
    {DType::BITS16, 2, "BITS16", ""},
    {DType::BITS1x8, 1, "BITS1x8", ""},
    {DType::BITS2x4, 1, "BITS2x4", ""},
    {DType::BITS4x2, 1, "BITS4x2", ""},
}};

// Quantized storages hold the integer representation of their values.
struct QuantizedClass {
  std::string_view storage_class;
  std::string_view torch_name;
  DType repr;
};
constexpr std::array<QuantizedClass, 5> kQuantized = {{
    {"QUInt8Storage", "quint8", DType::U8},
    {"QInt8Storage", "qint8", DType::I8},
    {"QInt32Storage", "qint32", DType::I32},
    {"QUInt4x2Storage", "quint4x2", DType::U8},
    {"QUInt2x4Storage", "quint2x4", DType::U8},
}};

const DTypeInfo& info(DType t) { return kInfo[static_cast<size_t>(t)]; }

// The table is indexed by the enum: a misplaced row would silently mislabel.
constexpr bool table_in_enum_order() {
  for (size_t k = 0; k < kInfo.size(); ++k)
    if (static_cast<size_t>(kInfo[k].type) != k) return false;
  return true;
}
static_assert(table_in_enum_order(), "kInfo rows must follow the DType enum");

}  // namespace

size_t dtype_itemsize(DType t) { return info(t).itemsize; }

std::string_view dtype_name(DType t) { return info(t).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (i.name == name) return i.type;
  return std::nullopt;
}

std::optional<DType> dtype_from_storage_class(std::string_view name) {
  for (const auto& i : kInfo)
    if (!i.storage_class.empty() && i.storage_class == name) return i.type;
  for (const auto& q : kQuantized)
    if (q.storage_class == name) return q.repr;
  return std::nullopt;
}

std::optional<std::string_view> quantized_storage_class(std::string_view name) {
  for (const auto& q : kQuantized)
    if (q.storage_class == name) return q.torch_name;
  return std::nullopt;
}

}  // namespace fastckpt
