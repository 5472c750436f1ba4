#include "formats/safetensors_reader.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "common/checked_math.h"
#include "common/error.h"

namespace fastckpt {
namespace {

using nlohmann::json;

// A valid header nests three deep ({name: {shape: [...]}}); anything much deeper
// is rejected before parsing so a hostile header cannot exhaust the stack.
constexpr int kMaxJsonDepth = 8;

// One pass over the raw header before it is parsed, so hostile input is refused
// before it costs a deep stack or a large parsed tree: nesting depth, the number
// of top-level entries (tensors) and the length of any list nested as deep as a
// shape (its dimensions).
void prescan_header(const std::string& path, const char* p, size_t n) {
  int depth = 0;
  bool in_string = false;
  size_t entries = 0;
  size_t list_items = 0;
  for (size_t i = 0; i < n; ++i) {
    char c = p[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > kMaxJsonDepth)
        throw LimitError(path + ": safetensors header nests deeper than " +
                         std::to_string(kMaxJsonDepth) + " levels");
      list_items = c == '[' ? 1 : 0;  // objects at shape depth are refused by the parser
    } else if (c == '}' || c == ']') {
      --depth;
    } else if (c == ':' && depth == 1) {
      if (++entries > kMaxSafetensorsTensors + 1)  // + 1: __metadata__
        throw LimitError(path + ": safetensors header lists more than the limit of " +
                         std::to_string(kMaxSafetensorsTensors) + " tensors");
    } else if (c == ',' && depth == 3 && list_items > 0) {
      if (++list_items > kMaxTensorDims)
        throw LimitError(path + ": a shape in the safetensors header has more than the limit of " +
                         std::to_string(kMaxTensorDims) + " dimensions");
    }
  }
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t as_u64(const std::string& path, const json& v, const std::string& what) {
  if (!v.is_number_unsigned()) fail(path, what + " must be a non-negative integer");
  return v.get<uint64_t>();
}

}  // namespace

CheckpointIndex read_safetensors(std::shared_ptr<MappedFile> file) {
  const std::string& path = file->path();
  CheckpointIndex index;
  index.file = file;
  index.format = "safetensors";
  if (file->size() < 8) fail(path, "too small to be a safetensors file (" + std::to_string(file->size()) + " bytes)");
  const uint64_t header_len = read_u64_le(file->data());
  if (header_len > kMaxSafetensorsHeader)
    throw LimitError(path + ": safetensors header length " + std::to_string(header_len) +
                     " exceeds the limit of " + std::to_string(kMaxSafetensorsHeader) + " bytes");
  const auto* header = reinterpret_cast<const char*>(file->span(8, header_len, "safetensors header"));
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = file->size() - data_start;
  prescan_header(path, header, header_len);

  json root = json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) fail(path, "safetensors header is not valid JSON");
  if (!root.is_object()) fail(path, "safetensors header is not a JSON object");

  struct Pending {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Pending> ranges;
  ranges.reserve(root.size());
  for (auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(path, "__metadata__ must be an object of strings");
      for (auto& [k, v] : entry.items())
        if (!v.is_string()) fail(path, "__metadata__ value for '" + k + "' is not a string");
      index.metadata_json = entry.dump();
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object()) fail(path, where + ": entry is not an object");
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || sh == entry.end() || off == entry.end())
      fail(path, where + ": entry needs dtype, shape and data_offsets");
    if (!dt->is_string()) fail(path, where + ": dtype is not a string");
    auto dtype = dtype_from_name(dt->get<std::string>());
    if (!dtype) fail(path, where + ": unknown dtype '" + dt->get<std::string>() + "'");
    if (!sh->is_array()) fail(path, where + ": shape is not a list");
    if (sh->size() > kMaxTensorDims)  // the prescan bounds lists at this depth already
      throw LimitError(path + ": " + where + " has more than the limit of " +
                       std::to_string(kMaxTensorDims) + " dimensions");
    if (!off->is_array() || off->size() != 2) fail(path, where + ": data_offsets is not [begin, end]");

    TensorRecord t;
    t.name = name;
    t.path = {name};
    t.dtype = *dtype;
    for (auto& d : *sh) {
      uint64_t v = as_u64(path, d, where + " shape entry");
      if (v > static_cast<uint64_t>(INT64_MAX)) fail(path, where + ": dimension too large");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const uint64_t numel = checked_numel(path, t);
    const auto nbytes = checked_mul(numel, dtype_itemsize(t.dtype));
    if (!nbytes) fail(path, where + ": byte size overflows 64 bits");
    const uint64_t begin = as_u64(path, (*off)[0], where + " data_offsets");
    const uint64_t end = as_u64(path, (*off)[1], where + " data_offsets");
    if (end < begin) fail(path, where + ": data_offsets end before they begin");
    if (end - begin != *nbytes)
      fail(path, where + ": data_offsets span " + std::to_string(end - begin) + " bytes but " +
                     std::string(dtype_name(t.dtype)) + " shape needs " + std::to_string(*nbytes));
    if (!range_fits(begin, end - begin, data_size))
      fail(path, where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                     ") lie past the end of the data (" + std::to_string(data_size) + " bytes)");
    // Row-major strides. An empty tensor's other dimensions are not bounded by
    // the data size, so their product (a stride) can still overflow.
    t.strides.assign(t.shape.size(), 1);
    for (size_t i = t.shape.size(); i-- > 1;) {
      auto stride = checked_mul(static_cast<uint64_t>(t.strides[i]), static_cast<uint64_t>(t.shape[i]));
      if (!stride || *stride > static_cast<uint64_t>(INT64_MAX))
        fail(path, where + ": strides overflow 64 bits");
      t.strides[i - 1] = static_cast<int64_t>(*stride);
    }
    t.storage = static_cast<uint32_t>(index.storages.size());
    index.storages.push_back({name, data_start + begin, end - begin, t.dtype});
    ranges.push_back({begin, end, index.tensors.size()});
    index.tensors.push_back(std::move(t));
  }

  // Tensors in file order; their byte ranges must tile the data exactly, as the
  // safetensors specification requires (no overlaps, no holes).
  std::sort(ranges.begin(), ranges.end(), [](const Pending& a, const Pending& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (const auto& r : ranges) {
    if (r.begin != cursor) {
      const auto& name = index.tensors[r.tensor].name;
      fail(path, r.begin < cursor ? "tensor '" + name + "' overlaps the tensor before it"
                                  : "hole in the data before tensor '" + name + "'");
    }
    cursor = r.end;
  }
  if (cursor != data_size)
    fail(path, "data section is " + std::to_string(data_size) + " bytes but tensors cover " +
                   std::to_string(cursor));
  std::vector<TensorRecord> ordered;
  std::vector<StorageRecord> storages;
  ordered.reserve(ranges.size());
  storages.reserve(ranges.size());
  for (const auto& r : ranges) {
    TensorRecord t = std::move(index.tensors[r.tensor]);
    storages.push_back(std::move(index.storages[t.storage]));
    t.storage = static_cast<uint32_t>(storages.size() - 1);
    ordered.push_back(std::move(t));
  }
  index.tensors = std::move(ordered);
  index.storages = std::move(storages);
  validate_index(index);
  return index;
}

}  // namespace fastckpt
