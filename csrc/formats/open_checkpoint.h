// Opens one checkpoint file of any supported format, chosen by its content
// (not its name): zip magic, legacy torch pickle magic, else safetensors.
#pragma once

#include <string>

#include "formats/checkpoint_index.h"

namespace fastckpt {

CheckpointIndex open_checkpoint_file(const std::string& path);

}  // namespace fastckpt
