#include "formats/torch_reader.h"

#include "common/error.h"

namespace fastckpt {

// Placeholder until the zip reader and the pickle VM land.
CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file) {
  fail(file->path(), "torch zip checkpoints are not supported yet");
}

CheckpointIndex read_torch_legacy(std::shared_ptr<MappedFile> file) {
  fail(file->path(), "legacy torch checkpoints are not supported yet");
}

}  // namespace fastckpt
