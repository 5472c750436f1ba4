#include "formats/open_checkpoint.h"

#include <cstring>

#include "common/error.h"
#include "formats/safetensors_reader.h"
#include "formats/torch_reader.h"
#include "io/fault_guard.h"

namespace fastckpt {

namespace {

CheckpointIndex read_by_content(const std::shared_ptr<MappedFile>& file) {
  const std::string& path = file->path();
  const uint8_t* p = file->data();
  const uint64_t n = file->size();
  if (n >= 4 && std::memcmp(p, "PK\x03\x04", 4) == 0) return read_torch_zip(file);
  // Legacy files start with the pickled magic number: PROTO 2, LONG1 of 10 bytes.
  if (n >= 4 && p[0] == 0x80 && p[1] == 0x02 && p[2] == 0x8a && p[3] == 0x0a) return read_torch_legacy(file);
  const bool named_safetensors =
      path.size() >= 12 && path.compare(path.size() - 12, 12, ".safetensors") == 0;
  if (named_safetensors || (n >= 9 && p[8] == '{')) return read_safetensors(file);
  fail(path, "not a checkpoint fastckpt can read (neither safetensors, torch zip nor legacy torch)");
}

}  // namespace

CheckpointIndex open_checkpoint_file(const std::string& path, bool exact_reads) {
  auto file = MappedFile::open(path);
  if (exact_reads) file->advise_random();
  // Readers parse from the mapping; the guard turns a concurrent truncation into
  // a CheckpointError instead of SIGBUS (see io/fault_guard.h).
  CheckpointIndex index = guarded_read(std::move(file), read_by_content);
  index_names(index);  // here, so that it is built on the opening threads too
  return index;
}

}  // namespace fastckpt
