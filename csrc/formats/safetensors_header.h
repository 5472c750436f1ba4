// The JSON header of a safetensors file, parsed in one streaming (SAX) pass
// into flat per-tensor entries. No JSON tree is built: for a 30k-tensor header
// the tree's allocations cost more than the whole rest of opening the file.
// Checking the entries (dtypes, shapes, offsets) is the reader's job; this only
// records what each entry holds and how its fields are typed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace fastckpt {

// A field holding a list of non-negative integers (shape, data_offsets). Its
// elements are SafetensorsHeader::values[begin, begin + count): one array for
// the whole header instead of two small allocations per tensor.
struct HeaderList {
  bool present = false;
  bool is_list = false;
  size_t begin = 0;
  size_t count = 0;
  size_t first_bad = SIZE_MAX;  // index (within the list) of the first element that is not a u64
};

struct HeaderEntry {
  std::string name;
  bool is_object = false;
  bool has_dtype = false;
  bool dtype_is_string = false;
  std::string dtype;
  HeaderList shape;
  HeaderList offsets;
};

struct SafetensorsHeader {
  bool valid_json = false;
  bool root_is_object = false;
  std::vector<HeaderEntry> entries;  // in header order; may repeat a name
  std::vector<uint64_t> values;       // list elements; a non-integer element is stored as 0
  bool has_metadata = false;
  bool metadata_is_object = false;
  std::vector<std::pair<std::string, std::string>> metadata;  // string values, in order
  std::optional<std::string> metadata_bad_key;                // first key whose value is not a string
};

// Parses `n` bytes of header text. `expected_entries` only sizes allocations.
SafetensorsHeader parse_safetensors_header(const char* text, size_t n, size_t expected_entries);

}  // namespace fastckpt
