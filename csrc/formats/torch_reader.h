// torch.save files: the zip format (torch >= 1.6) and the legacy format
// (magic number, a sequence of pickles, raw storages after them).
#pragma once

#include <memory>

#include "formats/checkpoint_index.h"

namespace fastckpt {

CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file);
CheckpointIndex read_torch_legacy(std::shared_ptr<MappedFile> file);

}  // namespace fastckpt
