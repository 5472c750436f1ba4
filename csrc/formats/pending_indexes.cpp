#include "formats/pending_indexes.h"

#include <algorithm>
#include <system_error>
#include <utility>

#include "formats/open_checkpoint.h"

namespace fastckpt {

PendingIndexes::PendingIndexes(std::vector<std::string> paths, size_t max_threads, bool exact_reads)
    : paths_(std::move(paths)), results_(paths_.size()), errors_(paths_.size()),
      exact_reads_(exact_reads) {
  const size_t n = std::min(paths_.size(), std::max<size_t>(1, max_threads));
  try {
    for (size_t k = 0; k < n; ++k) threads_.emplace_back([this] { work(); });
  } catch (const std::system_error&) {
    // No thread to be had: the files left over are opened by wait(), on the caller's thread.
  }
}

PendingIndexes::~PendingIndexes() { join(); }

void PendingIndexes::work() {
  // Each thread takes the next file not yet taken; results land in their own slots.
  for (size_t k = next_.fetch_add(1); k < paths_.size(); k = next_.fetch_add(1)) {
    try {
      results_[k] = std::make_shared<CheckpointIndex>(open_checkpoint_file(paths_[k], exact_reads_));
    } catch (...) {
      errors_[k] = std::current_exception();
    }
  }
}

void PendingIndexes::join() {
  for (auto& t : threads_) t.join();
  threads_.clear();
}

std::vector<std::shared_ptr<CheckpointIndex>> PendingIndexes::wait() {
  join();
  work();  // whatever no thread took (none started, or all of them were busy to the end)
  for (const auto& e : errors_)
    if (e) std::rethrow_exception(e);
  return results_;
}

}  // namespace fastckpt
