// One checkpoint file, memory-mapped read-only-for-the-file (MAP_PRIVATE), with
// its descriptor kept open for pread. Every byte range is checked before use.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

struct iovec;

namespace fastckpt {

class MappedFile {
 public:
  // Throws CheckpointError (naming the path) when the file cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  // Start of the mapping; nullptr for an empty file. The mapping is private and
  // writable so zero-copy tensors can be handed to torch: writes never reach the file.
  uint8_t* data() const { return data_; }

  // Pointer to [offset, offset + length), or CheckpointError naming `what`.
  const uint8_t* span(uint64_t offset, uint64_t length, const std::string& what) const;

  // Reads exactly `length` bytes at `offset` with pread (no SIGBUS if the file
  // shrinks under us: a short read becomes a CheckpointError).
  void pread_exact(void* dst, uint64_t offset, uint64_t length) const;

  // One contiguous file range [offset, +sum of lengths) read into several
  // buffers in order, in as few system calls as the kernel allows (preadv).
  // `iov` is consumed (advanced past what was read). Same errors as pread_exact.
  void preadv_exact(struct iovec* iov, int count, uint64_t offset) const;

  // True once a FaultGuard replaced part of this mapping with zeros because the
  // file shrank under it: from then on only pread tells the truth about the file.
  bool pages_lost() const { return pages_lost_.load(std::memory_order_acquire); }

  // Page-cache hints; failures are ignored (they are only hints).
  // advise_sequential also undoes advise_random's hint on the mapping.
  void advise_sequential(uint64_t offset, uint64_t length) const;
  // No readahead at all, for read() and for page faults in the mapping: only
  // the pages asked for are fetched (a rank reading its shard of a file).
  void advise_random() const;
  void advise_willneed(uint64_t offset, uint64_t length) const;
  void drop_from_page_cache() const;

 private:
  friend struct FaultGuardAccess;
  MappedFile(std::string path, int fd, uint64_t size, uint8_t* data);
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  uint8_t* data_ = nullptr;
  // Set by the SIGBUS handler (lock-free, so async-signal-safe).
  mutable std::atomic<bool> pages_lost_{false};
};

}  // namespace fastckpt
