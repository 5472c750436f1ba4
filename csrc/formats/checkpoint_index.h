// What every reader produces: a flat list of tensors, each a view (shape,
// strides, offset) of a byte range ("storage") of the file. Readers never copy
// tensor data; the copy engine and the Python layer read through this index.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dims.h"
#include "common/dtype.h"
#include "common/flat_string_map.h"
#include "io/mapped_file.h"

namespace fastckpt {

// A contiguous byte range of the file holding one storage's elements.
struct StorageRecord {
  std::string key;       // zip record name / legacy key / safetensors tensor name
  uint64_t file_offset;  // absolute offset of the first byte in the file
  uint64_t nbytes;
  DType dtype;
};

struct TensorRecord {
  std::string name;               // dotted path, e.g. "model.encoder.layers.0.fc1.weight"
  // The same path as container keys (keys may contain dots); empty when it is
  // just {name} (safetensors, where names are flat): see path_of().
  std::vector<std::string> path;
  DType dtype;
  Dims shape;
  Dims strides;                 // in elements
  uint64_t storage_offset = 0;  // in elements
  uint32_t storage = 0;          // index into CheckpointIndex::storages
};

// A tensor the file holds that fastckpt cannot represent (a sparse or quantized
// tensor, a numpy array, a dtype it does not know): listed, never read.
struct UnloadableRecord {
  std::string name;               // dotted path, as TensorRecord::name
  std::vector<std::string> path;  // as TensorRecord::path (empty: just {name})
  std::string what;               // "a sparse COO tensor", ...
};

struct CheckpointIndex {
  CheckpointIndex() = default;
  // Moves keep `by_name` valid (the records stay where they are); a copy would not.
  CheckpointIndex(CheckpointIndex&&) = default;
  CheckpointIndex& operator=(CheckpointIndex&&) = default;
  CheckpointIndex(const CheckpointIndex&) = delete;
  CheckpointIndex& operator=(const CheckpointIndex&) = delete;

  std::shared_ptr<MappedFile> file;
  std::string format;  // "safetensors" | "torch_zip" | "torch_legacy"
  std::vector<StorageRecord> storages;
  std::vector<TensorRecord> tensors;
  std::vector<UnloadableRecord> unloadable;
  // safetensors: the __metadata__ object; torch: plain (non-tensor) values of the
  // pickled tree, placeholders for objects of other classes. A JSON object text.
  std::string metadata_json = "{}";
  // Tensor name -> position in `tensors`, keys viewing the records' names. Filled
  // by the reader or by index_names() once it is done (readers refuse duplicate names).
  FlatStringMap by_name;

  const std::string& path() const { return file->path(); }
};

// A tensor's container path: its path, or {name} when that is left empty.
inline std::vector<std::string> path_of(const TensorRecord& t) {
  return t.path.empty() ? std::vector<std::string>{t.name} : t.path;
}

// Fills index.by_name from its records unless the reader did; call when they will
// not change any more.
void index_names(CheckpointIndex& index);

// Number of elements, or CheckpointError on negative dims / overflow.
uint64_t checked_numel(const std::string& path, const TensorRecord& t);

// Checks every tensor's reachable bytes lie inside its storage and every storage
// inside the file; all arithmetic overflow-checked. Readers call it last.
void validate_index(const CheckpointIndex& index);

// True when the tensor's elements are laid out contiguously (row-major).
bool is_contiguous(const TensorRecord& t);

}  // namespace fastckpt
