// Opens one checkpoint file of any supported format, chosen by its content
// (not its name): zip magic, legacy torch pickle magic, else safetensors.
#pragma once

#include <string>

#include "formats/checkpoint_index.h"

namespace fastckpt {

// `exact_reads`: parse with no readahead (MappedFile::advise_random), so that
// reading the headers fetches only their own pages.
CheckpointIndex open_checkpoint_file(const std::string& path, bool exact_reads = false);

}  // namespace fastckpt
