// safetensors: u64 little-endian header length, a JSON header, then the data.
#pragma once

#include <memory>

#include "formats/checkpoint_index.h"

namespace fastckpt {

// Largest header accepted (the safetensors library uses the same bound).
inline constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

CheckpointIndex read_safetensors(std::shared_ptr<MappedFile> file);

}  // namespace fastckpt
