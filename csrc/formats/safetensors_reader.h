// safetensors: u64 little-endian header length, a JSON header, then the data.
#pragma once

#include <memory>

#include "formats/checkpoint_index.h"

namespace fastckpt {

// Largest header accepted (the safetensors library uses the same bound).
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;
// Most tensors in one file. The largest published shards hold a few ten
// thousand; the bound keeps a hostile 100 MB header from costing gigabytes of
// parsed JSON and records.
inline constexpr size_t kMaxSafetensorsTensors = 1'000'000;
// Most dimensions of one tensor (torch itself stops at 64 in most kernels).
inline constexpr size_t kMaxTensorDims = 64;

CheckpointIndex read_safetensors(std::shared_ptr<MappedFile> file);

}  // namespace fastckpt
