// torch.save files: the zip format (torch >= 1.6) and the legacy format
// (magic number, a sequence of pickles, raw storages after them).
#pragma once

#include <memory>

#include "formats/checkpoint_index.h"

namespace fastckpt {

CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file);
// The torch.save archive that fills the file's bytes [base, base + length) (one
// tensor chunk or value of a DCP .distcp file). Storage offsets are absolute in
// the file, so the index reads like any other; errors name the byte range.
CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file, uint64_t base, uint64_t length);
CheckpointIndex read_torch_legacy(std::shared_ptr<MappedFile> file);

}  // namespace fastckpt
