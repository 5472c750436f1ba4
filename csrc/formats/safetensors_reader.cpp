#include "formats/safetensors_reader.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string_view>

#include "common/checked_math.h"
#include "common/error.h"
#include "common/flat_string_map.h"
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

  // Check every entry in header order (the first bad one is reported), keeping
  // only what the records need; error texts are built only when failing.
  struct Checked {
    uint64_t begin, end;
    size_t entry;
    DType dtype;
    bool unloadable;  // in index.unloadable: covers its bytes, gets no record
  };
  std::vector<Checked> checked;
  checked.reserve(parsed.entries.size());
  FlatStringMap seen(parsed.entries.size());
  for (size_t e = 0; e < parsed.entries.size(); ++e) {
    const HeaderEntry& entry = parsed.entries[e];
    const std::string& name = entry.name;
    auto bad = [&](const std::string& what) { fail(path, "tensor '" + name + "'" + what); };
    if (!seen.emplace(name, 0).second) fail(path, "tensor '" + name + "' appears twice in the header");
    if (!entry.is_object) bad(": entry is not an object");
    if (!entry.has_dtype || !entry.shape.present || !entry.offsets.present)
      bad(": entry needs dtype, shape and data_offsets");
    if (!entry.dtype_is_string) bad(": dtype is not a string");
    // "F4" counts 4-bit values: torch holds them as float4_e2m1fn_x2 pairs, so
    // the last dimension halves. A dtype fastckpt does not know (or an F4 shape
    // torch cannot pair) is listed as unloadable, its bytes still accounted for.
    const bool f4 = entry.dtype == "F4";
    auto dtype = f4 ? std::optional<DType>(DType::F4_X2) : dtype_from_name(entry.dtype);
    std::string unloadable;
    if (!dtype) unloadable = "a tensor of dtype '" + entry.dtype + "', which fastckpt does not know";
    const HeaderList& sh = entry.shape;
    const HeaderList& off = entry.offsets;
    if (!sh.is_list) bad(": shape is not a list");
    if (sh.count > kMaxTensorDims)  // the prescan bounds lists at this depth already
      throw LimitError(path + ": tensor '" + name + "' has more than the limit of " +
                       std::to_string(kMaxTensorDims) + " dimensions");
    if (!off.is_list || off.count != 2) bad(": data_offsets is not [begin, end]");
    // Element count, overflow-checked, and each dimension within int64.
    for (size_t i = 0; i < sh.count; ++i) {
      if (i >= sh.first_bad) bad(" shape entry must be a non-negative integer");
      if (parsed.values[sh.begin + i] > static_cast<uint64_t>(INT64_MAX)) bad(": dimension too large");
    }
    uint64_t numel = 1;
    for (size_t i = 0; i < sh.count; ++i) {
      const auto next = checked_mul(numel, parsed.values[sh.begin + i]);
      if (!next) bad(": element count overflows 64 bits");
      numel = *next;
    }
    if (f4 && (sh.count == 0 || parsed.values[sh.begin + sh.count - 1] % 2 != 0))
      unloadable = "an F4 tensor whose last dimension is odd (torch packs F4 values in pairs)";
    if (f4 && unloadable.empty()) numel /= 2;
    if (off.first_bad < 2) bad(" data_offsets must be a non-negative integer");
    const uint64_t begin = parsed.values[off.begin];
    const uint64_t end = parsed.values[off.begin + 1];
    if (end < begin) bad(": data_offsets end before they begin");
    if (unloadable.empty()) {
      const auto nbytes = checked_mul(numel, dtype_itemsize(*dtype));
      if (!nbytes) bad(": byte size overflows 64 bits");
      if (end - begin != *nbytes)
        bad(": data_offsets span " + std::to_string(end - begin) + " bytes but " + entry.dtype +
            " shape needs " + std::to_string(*nbytes));
    }
    if (!range_fits(begin, end - begin, data_size))
      bad(": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
          ") lie past the end of the data (" + std::to_string(data_size) + " bytes)");
    // Row-major strides. An empty tensor's other dimensions are not bounded by
    // the data size, so their product (a stride) can still overflow.
    uint64_t stride = 1;
    for (size_t i = sh.count; i-- > 1;) {
      auto next = checked_mul(stride, parsed.values[sh.begin + i]);
      if (!next || *next > static_cast<uint64_t>(INT64_MAX)) bad(": strides overflow 64 bits");
      stride = *next;
    }
    const bool listed_only = !unloadable.empty();
    if (listed_only) index.unloadable.push_back(UnloadableRecord{name, {}, std::move(unloadable)});
    checked.push_back({begin, end, e, dtype.value_or(DType::U8), listed_only});
  }

  // Tensors in file order; their byte ranges must tile the data exactly, as the
  // safetensors specification requires (no overlaps, no holes).
  std::sort(checked.begin(), checked.end(), [](const Checked& a, const Checked& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t cursor = 0;
  for (const auto& c : checked) {
    if (c.begin != cursor) {
      const auto& name = parsed.entries[c.entry].name;
      fail(path, c.begin < cursor ? "tensor '" + name + "' overlaps the tensor before it"
                                  : "hole in the data before tensor '" + name + "'");
    }
    cursor = c.end;
  }
  if (cursor != data_size)
    fail(path, "data section is " + std::to_string(data_size) + " bytes but tensors cover " +
                   std::to_string(cursor));

  // Records in file order. A safetensors tensor's path is just its name, left
  // empty here (see TensorRecord::path); the storage key is the name too.
  const size_t n_tensors = checked.size() - index.unloadable.size();
  index.tensors.resize(n_tensors);
  index.storages.reserve(n_tensors);
  seen.clear();  // its views point into the names moved below
  size_t k = 0;
  for (const Checked& c : checked) {
    if (c.unloadable) continue;
    HeaderEntry& entry = parsed.entries[c.entry];
    TensorRecord& t = index.tensors[k];
    t.dtype = c.dtype;
    t.shape.fill(entry.shape.count, 0);
    for (size_t i = 0; i < entry.shape.count; ++i)  // checked above to fit int64
      t.shape[i] = static_cast<int64_t>(parsed.values[entry.shape.begin + i]);
    if (entry.dtype == "F4") t.shape[entry.shape.count - 1] /= 2;  // F4 counts halves of a byte
    t.strides.fill(t.shape.size(), 1);
    for (size_t i = t.shape.size(); i-- > 1;) t.strides[i - 1] = t.strides[i] * t.shape[i];
    t.storage = static_cast<uint32_t>(k);
    index.storages.push_back({entry.name, data_start + c.begin, c.end - c.begin, c.dtype});
    t.name = std::move(entry.name);
    ++k;
  }
  validate_index(index);
  return index;
}

}  // namespace fastckpt
