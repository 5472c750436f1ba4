// Turns "the file shrank while we were parsing it" into a CheckpointError
// instead of a SIGBUS that kills the process.
//
// Why a fault guard and not pread: every reader (safetensors, torch zip, pickle
// VM, legacy) parses its metadata straight from the mapping, and some of those
// readers are large; copying each header through pread would need a second
// code path in each of them. The guard covers all of them in one place,
// around open_checkpoint_file.
//
// Why not sigsetjmp/siglongjmp: jumping out of the parser skips C++
// destructors (undefined behaviour, leaks, half-built containers). Instead the
// SIGBUS handler maps a zero-filled page over the lost part of the mapping and
// returns, so the faulting load simply reads zeros. Parsers already handle
// arbitrary bytes (they are fuzzed), so they run to completion or throw as
// usual; the guard then reports the fault as a CheckpointError naming the file.
//
// Only faults that hit the mapping this thread is guarding are handled; any
// other SIGBUS goes to the handler that was installed before (or kills the
// process as it would have). What is not covered: a zero-copy tensor handed to
// the user (Checkpoint.tensor) whose file shrinks later; see docs/HARDENING.md.
#pragma once

#include <cstdint>

#include "io/mapped_file.h"

namespace fastckpt {

class FaultGuard {
 public:
  // Guards the file's own mapping.
  explicit FaultGuard(const MappedFile& file);
  // Guards another mapping of the file, [begin, +size) (a FileView); a fault
  // there zero-fills the rest of that mapping and sets the file's pages_lost().
  FaultGuard(const MappedFile& file, const uint8_t* begin, uint64_t size);
  ~FaultGuard();
  FaultGuard(const FaultGuard&) = delete;
  FaultGuard& operator=(const FaultGuard&) = delete;

  // True once a page of the guarded mapping was lost (and replaced by zeros).
  bool faulted() const;
  // Throws CheckpointError when a fault happened or the file is now smaller than
  // the mapping (truncated after the last page we touched).
  void check() const;

 private:
  friend struct FaultGuardAccess;
  const MappedFile& file_;
  const uint8_t* begin_;
  uint64_t size_;
  FaultGuard* previous_;           // guards nest per thread (a reader opening a shard)
  volatile int faulted_ = 0;       // written by the signal handler
};

// Runs `read(file)` under a FaultGuard; a fault or a shrink during the read
// becomes a CheckpointError, whatever the reader itself returned or threw.
template <class Read>
auto guarded_read(const std::shared_ptr<MappedFile>& file, Read&& read) {
  FaultGuard guard(*file);
  try {
    auto result = read(file);
    guard.check();
    return result;
  } catch (...) {
    guard.check();  // the fault explains the reader's error better than the reader does
    throw;
  }
}

}  // namespace fastckpt
