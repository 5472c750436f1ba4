#include "formats/safetensors_reader.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>
#include <unordered_set>

#include "common/checked_math.h"
#include "common/error.h"
#include "formats/safetensors_header.h"

namespace fastckpt {
namespace {

using nlohmann::json;

// A valid header nests three deep ({name: {shape: [...]}}); anything much deeper
// is rejected before parsing so a hostile header cannot exhaust the stack.
constexpr int kMaxJsonDepth = 8;

// One pass over the raw header before it is parsed, so hostile input is refused
// before it costs a deep stack or a large parsed tree: nesting depth, the number
// of top-level entries (tensors) and the length of any list nested as deep as a
// shape (its dimensions). Returns the number of top-level entries.
size_t prescan_header(const std::string& path, const char* p, size_t n) {
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
  return entries;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t element(const std::string& path, const HeaderList& list, size_t i, const std::string& what) {
  if (i >= list.first_bad) fail(path, what + " must be a non-negative integer");
  return list.values[i];
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
  const size_t expected = prescan_header(path, header, header_len);

  SafetensorsHeader parsed = parse_safetensors_header(header, header_len, expected);
  if (!parsed.valid_json) fail(path, "safetensors header is not valid JSON");
  if (!parsed.root_is_object) fail(path, "safetensors header is not a JSON object");
  if (parsed.has_metadata) {
    if (!parsed.metadata_is_object) fail(path, "__metadata__ must be an object of strings");
    if (parsed.metadata_bad_key)
      fail(path, "__metadata__ value for '" + *parsed.metadata_bad_key + "' is not a string");
    json meta = json::object();
    for (auto& [k, v] : parsed.metadata) meta[k] = std::move(v);
    index.metadata_json = meta.dump();
  }

  struct Pending {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Pending> ranges;
  ranges.reserve(parsed.entries.size());
  index.tensors.reserve(parsed.entries.size());
  index.storages.reserve(parsed.entries.size());
  std::unordered_set<std::string_view> seen;
  seen.reserve(parsed.entries.size());
  for (HeaderEntry& entry : parsed.entries) {
    const std::string& name = entry.name;
    if (!seen.insert(name).second) fail(path, "tensor '" + name + "' appears twice in the header");
    const std::string where = "tensor '" + name + "'";
    if (!entry.is_object) fail(path, where + ": entry is not an object");
    if (!entry.has_dtype || !entry.shape.present || !entry.offsets.present)
      fail(path, where + ": entry needs dtype, shape and data_offsets");
    if (!entry.dtype_is_string) fail(path, where + ": dtype is not a string");
    auto dtype = dtype_from_name(entry.dtype);
    if (!dtype) fail(path, where + ": unknown dtype '" + entry.dtype + "'");
    const HeaderList& sh = entry.shape;
    const HeaderList& off = entry.offsets;
    if (!sh.is_list) fail(path, where + ": shape is not a list");
    if (sh.values.size() > kMaxTensorDims)  // the prescan bounds lists at this depth already
      throw LimitError(path + ": " + where + " has more than the limit of " +
                       std::to_string(kMaxTensorDims) + " dimensions");
    if (!off.is_list || off.values.size() != 2) fail(path, where + ": data_offsets is not [begin, end]");

    TensorRecord t;
    t.name = name;
    t.path = {name};
    t.dtype = *dtype;
    t.shape.reserve(sh.values.size());
    for (size_t i = 0; i < sh.values.size(); ++i) {
      uint64_t v = element(path, sh, i, where + " shape entry");
      if (v > static_cast<uint64_t>(INT64_MAX)) fail(path, where + ": dimension too large");
      t.shape.push_back(static_cast<int64_t>(v));
    }
    const uint64_t numel = checked_numel(path, t);
    const auto nbytes = checked_mul(numel, dtype_itemsize(t.dtype));
    if (!nbytes) fail(path, where + ": byte size overflows 64 bits");
    const uint64_t begin = element(path, off, 0, where + " data_offsets");
    const uint64_t end = element(path, off, 1, where + " data_offsets");
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
