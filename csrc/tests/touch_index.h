// Reads every byte an index says is there, so a sanitizer build catches a
// reader that validated a range it got wrong.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common/error.h"
#include "formats/checkpoint_index.h"

namespace fastckpt::testing {

// Sum of every storage byte plus each tensor's first and last reachable byte.
inline uint64_t touch_index(const CheckpointIndex& index) {
  // Every reader validates its index; one that does not validate here is a bug,
  // and reading through it could leave the mapping unnoticed by the sanitizers.
  try {
    validate_index(index);
  } catch (const CheckpointError& e) {
    throw std::logic_error(std::string("reader returned an index that does not validate: ") +
                           e.what());
  }
  uint64_t sum = 0;
  const uint8_t* base = index.file->data();
  for (const auto& s : index.storages)
    for (uint64_t i = 0; i < s.nbytes; ++i) sum += base[s.file_offset + i];
  for (const auto& t : index.tensors) {
    const auto& s = index.storages.at(t.storage);
    if (checked_numel(index.path(), t) == 0) continue;
    uint64_t last = t.storage_offset;
    for (size_t d = 0; d < t.shape.size(); ++d)
      last += static_cast<uint64_t>(t.shape[d] - 1) * static_cast<uint64_t>(t.strides[d]);
    const uint64_t item = dtype_itemsize(t.dtype);
    sum += base[s.file_offset + t.storage_offset * item];
    sum += base[s.file_offset + (last + 1) * item - 1];
  }
  return sum;
}

}  // namespace fastckpt::testing
