// torch.distributed.checkpoint's `.metadata` (the default FileSystemWriter's
// layout): a pickle of `Metadata` read through the restricted PickleVM, which
// admits only DCP's own records (is_dcp_metadata_global) and calls nothing.
// The result is plain records: per flattened key its tensor metadata (dtype,
// global size, chunks) or that it is a bytes value, its planner_data path, and
// for every chunk or value where its bytes are (file, offset, length, transforms).
// Everything the records say about each other is checked here: chunks inside
// their tensor, tiling it exactly (no overlap, nothing missing), each with one
// storage entry, relative paths that stay in the directory.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dims.h"
#include "formats/pickle_vm.h"
#include "io/mapped_file.h"

namespace fastckpt {

struct DcpChunk {
  Dims offsets;      // in the global tensor
  Dims sizes;
  uint32_t storage;  // index into DcpMetadata::storage
};

struct DcpItem {
  std::string fqn;                // the flattened key ("model.layers.0.w" or "optim.state.x.exp_avg")
  std::vector<std::string> path;  // planner_data's path (list indices as decimal text); {fqn} when absent
  bool is_bytes = false;          // a non-tensor value (torch.save'd object or raw BytesIO)
  std::string dtype;              // fastckpt dtype name ("F32"); empty when fastckpt does not know it
  std::string torch_dtype;        // as pickled ("torch.float32")
  std::string layout;             // "torch.strided" for tensors fastckpt can read
  Dims size;                      // global shape
  std::vector<DcpChunk> chunks;
  uint32_t storage = 0;           // bytes values: index into DcpMetadata::storage
};

struct DcpStorage {
  std::string relative_path;  // the .distcp file, relative to the directory
  uint64_t offset = 0;        // of the blob in that file
  uint64_t length = 0;
  std::vector<std::string> transforms;  // storage transform descriptors; empty: none
};

struct DcpMetadata {
  std::vector<DcpItem> items;
  std::vector<DcpStorage> storage;
  std::string version;  // Metadata.version ("1.0.0"); empty when absent
};

// Reads and checks `<dir>/.metadata` (`path` names it). CheckpointError / LimitError name the file.
DcpMetadata read_dcp_metadata(const std::string& path);
// The same from bytes already in memory (fuzzing, tests); `path` labels errors.
DcpMetadata parse_dcp_metadata(const uint8_t* data, size_t size, const std::string& path);

// A non-tensor value of a .distcp file: the torch.save archive at [base, +length)
// run through the PickleVM (torch.save's global rules), for the bindings to turn
// into plain Python values. `bytes` holds the pickle the VM's strings view.
struct ArchivePickle {
  std::vector<uint8_t> bytes;
  std::unique_ptr<pickle::PickleVM> vm;
  pickle::Value root;
};
ArchivePickle read_archive_pickle(const MappedFile& file, uint64_t base, uint64_t length);

}  // namespace fastckpt
