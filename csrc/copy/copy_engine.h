// Runs copy tasks on a thread pool. Work is split into units (ranges of the
// destination's elements) ordered by file offset, so the file is read nearly
// sequentially however many workers there are; runs of small tensors that lie
// back to back (or a few bytes apart) in the file are read together, one system
// call per run. Host memory beyond the destinations is bounded by max_host_bytes
// (per-thread staging + device ring).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "copy/copy_plan.h"
#include "copy/device_sink.h"

namespace fastckpt {

class FileView;
class MappedFile;

struct EngineOptions {
  size_t threads = 2;
  uint64_t max_host_bytes = uint64_t{256} << 20;
  // Fetch only the pages the tasks need (a rank loading its shard): no
  // readahead, and strided sources read run by run with pread, not gathered
  // through the mapping. The page cache is still used where it already holds a range.
  bool exact_reads = false;
};

class CopyEngine {
 public:
  // `sink` is required when any task has dst_on_device. `label_text` holds the
  // text the tasks' labels view (kept alive here). Validates every task.
  CopyEngine(std::vector<CopyTask> tasks, EngineOptions options, std::unique_ptr<DeviceSink> sink,
             std::shared_ptr<const std::string> label_text);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Copies everything; returns when every byte is in place (on the device too).
  void run();

  const std::vector<CopyTask>& tasks() const { return tasks_; }
  uint64_t total_bytes() const { return total_bytes_; }  // source bytes to read
  uint64_t bytes_done() const { return bytes_done_.load(std::memory_order_relaxed); }
  // Source bytes copied straight out of the page cache (io/file_view.h), not read().
  uint64_t bytes_from_cache() const { return bytes_from_cache_.load(std::memory_order_relaxed); }

  struct Unit {
    uint32_t task;
    uint64_t first;  // destination elements [first, first + count)
    uint64_t count;
  };
  // What one worker claims at a time: units [first_unit, +n_units). A run of
  // small whole-tensor units whose bytes follow each other in the file (or are
  // apart by a few bytes of framing, as zip records are), copied as they are
  // into dense host memory, is read with one preadv ("vectored").
  struct Work {
    uint32_t first_unit;
    uint32_t n_units;
    bool vectored;
    uint64_t src_bytes;   // tensor bytes
    uint32_t n_iov = 1;   // iovecs of the preadv: units plus the gaps between them
    uint64_t span_bytes;  // file bytes from the first unit's start to the last one's end
  };
  struct TaskInfo;
  class Worker;

 private:
  std::vector<uint32_t> file_order() const;
  void plan_work();
  // Absolute file offset of the first source byte task `task` reads (before any row selection).
  uint64_t source_start(uint32_t task) const;
  void open_views();
  // exact_reads: asks the kernel for every source range up front, dense ones and
  // the runs of strided ones that are read with pread (POSIX_FADV_WILLNEED,
  // exactly those pages), so the reads queue deep as readahead would.
  void prefetch_exact_ranges(const std::atomic<bool>& stop) const;
  FileView* view_of(const MappedFile* file) const;

  std::vector<CopyTask> tasks_;
  std::shared_ptr<const std::string> label_text_;
  std::vector<TaskInfo> info_;
  std::vector<Unit> units_;
  std::vector<Work> work_;
  EngineOptions options_;
  std::unique_ptr<DeviceSink> sink_;
  std::unordered_map<const MappedFile*, std::unique_ptr<FileView>> views_;  // filled by run()
  uint64_t total_bytes_ = 0;
  uint64_t bounce_bytes_ = 0;  // per worker, for streamed reads
  std::atomic<uint64_t> bytes_done_{0};
  std::atomic<uint64_t> bytes_from_cache_{0};
  bool ran_ = false;
};

}  // namespace fastckpt
