// One copy task per (source tensor, destination tensor) pair: where the source
// bytes are, which rows of it are wanted, how to convert, where they go.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/dims.h"
#include "common/dtype.h"
#include "io/mapped_file.h"

namespace fastckpt {

// Rows taken from the source's first dimension: all of them, [start, start + count),
// or target row i = source row index[i]. Only the selected rows' bytes are read.
struct RowSelection {
  enum class Kind { All, Range, Index };
  Kind kind = Kind::All;
  int64_t start = 0;
  int64_t count = 0;
  std::vector<int64_t> index;
};

struct CopyTask {
  // "source -> target", for error messages. A view: the text lives in one block
  // the engine owns for all its tasks (30k small strings cost milliseconds).
  std::string_view label;
  std::shared_ptr<MappedFile> file;
  uint64_t storage_file_offset = 0;  // absolute file offset of the source storage
  uint64_t storage_nbytes = 0;
  DType src_dtype = DType::F32;
  Dims src_shape;
  Dims src_strides;  // elements
  uint64_t src_offset = 0;           // elements into the storage
  RowSelection rows;
  std::optional<DType> via_dtype;  // round through this dtype on the way (a rule's dtype=)
  DType dst_dtype = DType::F32;
  uint8_t* dst = nullptr;            // host address, or a device address when dst_on_device
  Dims dst_shape;
  Dims dst_strides;  // elements
  bool dst_on_device = false;
};

// True when a view with these strides covers its elements densely in row-major order.
bool is_dense(const Dims& shape, const Dims& strides);
uint64_t element_count(const Dims& shape);

// Checks the task is self-consistent (ranks, row indices, shapes after the row
// selection, a supported cast, in-storage source extent); CheckpointError naming
// the file and the task otherwise.
void validate_task(const CopyTask& task);

}  // namespace fastckpt
