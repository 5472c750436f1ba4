// Indexes checkpoint files on background threads, so the caller can do other
// work meanwhile: load_into walks the model's tensors (which needs the GIL)
// while the files' headers are parsed (which does not). Shards are indexed in
// parallel, up to `max_threads` at a time.
#pragma once

#include <atomic>
#include <cstddef>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "formats/checkpoint_index.h"

namespace fastckpt {

class PendingIndexes {
 public:
  // `exact_reads`: see open_checkpoint_file.
  PendingIndexes(std::vector<std::string> paths, size_t max_threads, bool exact_reads = false);
  ~PendingIndexes();  // waits for the threads; their results are dropped
  PendingIndexes(const PendingIndexes&) = delete;
  PendingIndexes& operator=(const PendingIndexes&) = delete;

  // Waits for every file. Returns the indexes in path order, or rethrows the
  // error of the first file (in path order) that failed. May be called again.
  std::vector<std::shared_ptr<CheckpointIndex>> wait();

 private:
  void work();
  void join();

  std::vector<std::string> paths_;
  std::vector<std::shared_ptr<CheckpointIndex>> results_;
  std::vector<std::exception_ptr> errors_;
  std::vector<std::thread> threads_;
  std::atomic<size_t> next_{0};
  bool exact_reads_ = false;
};

}  // namespace fastckpt
