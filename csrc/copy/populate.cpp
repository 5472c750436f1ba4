#include "copy/populate.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>

#include "copy/thread_pool.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older headers lack the name
#endif

namespace fastckpt {
namespace {

// Ranges are cut into pieces of at most this much, so that threads share a
// large tensor and none waits on a small one.
constexpr uint64_t kPiece = uint64_t{8} << 20;

struct Piece {
  uintptr_t start;
  uint64_t bytes;
};

}  // namespace

uint64_t populate_for_writing(const std::vector<WritableRange>& ranges, size_t threads) {
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  std::vector<Piece> pieces;
  for (const WritableRange& r : ranges) {
    // Whole pages only: the partial ones at the ends may hold other objects' bytes.
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(r.data) + page - 1) / page * page;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(r.data) + r.bytes) / page * page;
    for (uintptr_t at = begin; at < end; at += kPiece) pieces.push_back({at, std::min<uint64_t>(kPiece, end - at)});
  }
  if (pieces.empty()) return 0;
  std::atomic<size_t> next{0};
  std::atomic<uint64_t> done{0};
  std::atomic<bool> refused{false};
  auto work = [&](size_t) {
    for (size_t k = next++; k < pieces.size() && !refused.load(std::memory_order_relaxed); k = next++) {
      if (::madvise(reinterpret_cast<void*>(pieces[k].start), pieces[k].bytes, MADV_POPULATE_WRITE) != 0) {
        refused = true;  // EINVAL from an older kernel; ENOMEM: leave the rest to the faults
        return;
      }
      done += pieces[k].bytes;
    }
  };
  const size_t n = std::max<size_t>(1, std::min(threads, pieces.size()));
  if (n == 1) {
    work(0);
  } else {
    ThreadPool pool(n);
    pool.run_on_all(work);
  }
  return done.load();
}

}  // namespace fastckpt
