#include "copy/copy_engine.h"

#include <algorithm>
#include <cstring>
#include <set>
#include <thread>
#include <unordered_map>

#include <sys/uio.h>

#include "common/error.h"
#include "copy/cast.h"
#include "copy/staging_ring.h"
#include "copy/stream_copy.h"
#include "copy/strided_copy.h"
#include "copy/thread_pool.h"
#include "io/fault_guard.h"
#include "io/file_view.h"

namespace fastckpt {
namespace {

// Big dense copies are cut into pieces this size so every worker gets a share
// of a large tensor; small enough to balance, large enough for long reads.
constexpr uint64_t kChunkBytes = uint64_t{8} << 20;
constexpr uint64_t kMinHostBytes = uint64_t{1} << 20;
// Large same-dtype reads into host memory that the page cache does not hold
// (cached ones come out of the FileView, below) go through a cache-sized bounce
// buffer and non-temporal stores (copy/stream_copy.h) rather than read()
// straight into the destination: the write-allocate reads of cached stores cost
// more than the extra copy out of an L2-sized buffer (1.4 GB warm, a C
// microbenchmark: 0.063-0.069 s against 0.072-0.078 s; bench/RESULTS.md).
constexpr uint64_t kStreamMinBytes = uint64_t{1} << 20;
constexpr uint64_t kBounceBytes = uint64_t{256} << 10;
// Dense source ranges at least this large are copied out of the file's FileView
// when the page cache holds them (io/file_view.h); smaller ones are not worth
// the cachestat call and the page faults.
constexpr uint64_t kViewMinBytes = uint64_t{1} << 20;
// A vectored read gathers at most this many iovecs (Linux's preadv limit) or bytes.
constexpr uint32_t kMaxVectoredIov = 1024;
constexpr uint64_t kMaxVectoredBytes = uint64_t{4} << 20;
// Bytes between two tensors that a vectored read still reads (into scratch) to
// keep going: a zip record's local header and alignment padding are ~100 bytes.
// torch.save of 30k small tensors: 30k preads become 60 preadv calls.
constexpr uint64_t kMaxVectoredGap = 4096;
// exact_reads: runs of a strided source at least this long are read with
// pread (several per preadv when under a page apart: such a gap holds no whole
// page, so reading it fetches nothing more); shorter runs, such as single
// elements of a transposed view, are gathered from the mapping, whose faults
// then fetch one page each (MappedFile::advise_random).
constexpr uint64_t kExactMinRunBytes = 512;
constexpr uint64_t kExactMaxGap = 4095;

}  // namespace

struct CopyEngine::TaskInfo {
  uint64_t row_elems = 1;  // elements per row of dim 0 (1 for a scalar)
  uint64_t out_elems = 0;
  uint64_t src_start = 0;  // absolute file offset of the first source byte (before row selection)
  size_t src_item = 0;
  size_t mid_item = 0;
  size_t dst_item = 0;
  bool src_dense = false;
  uint64_t src_run_elems = 1;  // elements per contiguous run of the source view (its dense trailing dims)
  bool dst_dense = false;
  bool same_dtype = false;   // no conversion at all
  bool two_casts = false;    // src -> via -> dst
  CastFn first_cast = nullptr;   // src -> (via or dst)
  CastFn second_cast = nullptr;  // via -> dst
  CastFn stream_cast = nullptr;  // src -> dst with non-temporal stores, if there is one
};

namespace {

struct Buffer {
  std::vector<uint8_t> bytes;
  uint8_t* get(size_t n) {
    if (bytes.size() < n) bytes.resize(n);
    return bytes.data();
  }
};

[[noreturn]] void rethrow_with_label(const CopyTask& t, const std::exception& e) {
  throw CheckpointError(std::string(e.what()) + " (while copying " + std::string(t.label) + ")");
}

// Calls fn(file_offset, bytes, pos) for each run of source elements [src_first, +n)
// of a strided source, in flat order; a run is `run_elems` consecutive elements of
// its dense trailing dimensions (cut at src_first and src_first + n).
template <class Fn>
void for_each_run(const CopyTask& t, uint64_t item, uint64_t run_elems, uint64_t src_first, uint64_t n,
                  Fn&& fn) {
  const Dims& shape = t.src_shape;
  const Dims& strides = t.src_strides;
  for (uint64_t pos = src_first; pos < src_first + n;) {
    // Storage element of flat position `pos`: the run's outer coordinates, then the offset in it.
    uint64_t run = pos / run_elems;
    const uint64_t within = pos % run_elems;
    uint64_t elem = t.src_offset + within;
    uint64_t inner = 1;  // elements of the dims inside the run
    for (size_t d = shape.size(); d-- > 0;) {
      if (inner < run_elems) {
        inner *= static_cast<uint64_t>(shape[d]);
        continue;
      }
      const auto extent = static_cast<uint64_t>(shape[d]);
      elem += (run % extent) * static_cast<uint64_t>(strides[d]);
      run /= extent;
    }
    const uint64_t count = std::min(run_elems - within, src_first + n - pos);
    fn(t.storage_file_offset + elem * item, count * item, pos);
    pos += count;
  }
}

}  // namespace

class CopyEngine::Worker {
 public:
  Worker(CopyEngine& engine, StagingRing* ring) : e_(engine), ring_(ring) {}

  void process(const Work& w) {
    if (w.vectored && w.n_units > 1) {
      try {
        read_vectored(w);
        e_.bytes_done_.fetch_add(w.src_bytes, std::memory_order_relaxed);
        return;
      } catch (const CheckpointError&) {
        // Unit by unit below: the failing unit's error then names its tensors.
      }
    }
    for (uint32_t k = 0; k < w.n_units; ++k) process(e_.units_[w.first_unit + k]);
  }

  void process(const Unit& u) {
    const CopyTask& t = e_.tasks_[u.task];
    const TaskInfo& info = e_.info_[u.task];
    const uint64_t out_bytes = u.count * info.dst_item;
    try {
      if (t.dst_on_device) {
        const size_t slot = ring_->acquire();
        struct Release {
          StagingRing* ring;
          size_t slot;
          ~Release() { ring->release(slot); }
        } release{ring_, slot};
        uint8_t* staged = ring_->slot(slot);
        produce(t, info, u, staged);
        e_.sink_->copy_async(t.dst + u.first * info.dst_item, staged, out_bytes, slot);
      } else if (info.dst_dense) {
        const bool large = out_bytes >= kStreamMinBytes;
        stream_ = info.same_dtype && large && e_.bounce_bytes_ > 0;
        stream_cast_ = large && info.stream_cast != nullptr;
        produce(t, info, u, t.dst + u.first * info.dst_item);
        stream_ = stream_cast_ = false;
      } else {
        uint8_t* staged = out_.get(out_bytes);
        produce(t, info, u, staged);
        scatter(staged, u.first, u.count,
                StridedView{t.dst, &t.dst_shape, &t.dst_strides, info.dst_item});
      }
    } catch (const CheckpointError& err) {
      rethrow_with_label(t, err);
    }
    e_.bytes_done_.fetch_add(u.count * info.src_item, std::memory_order_relaxed);
  }

 private:
  // Whole tensors, back to back in one file, same dtype, dense on both sides.
  // Gaps between them (plan_work keeps them under kMaxVectoredGap) land in scratch.
  void read_vectored(const Work& w) {
    iov_.resize(w.n_iov);
    const Unit& first = e_.units_[w.first_unit];
    const CopyTask& t0 = e_.tasks_[first.task];
    const uint64_t offset = e_.source_start(first.task);
    uint8_t* scratch = gap_.get(kMaxVectoredGap);
    uint64_t end = offset;
    size_t n = 0;
    for (uint32_t k = 0; k < w.n_units; ++k) {
      const Unit& u = e_.units_[w.first_unit + k];
      const CopyTask& t = e_.tasks_[u.task];
      const uint64_t at = e_.source_start(u.task);
      if (at > end) iov_[n++] = {scratch, static_cast<size_t>(at - end)};
      iov_[n++] = {t.dst, static_cast<size_t>(u.count * e_.info_[u.task].src_item)};
      end = at + iov_[n - 1].iov_len;
    }
    if (n != w.n_iov || end - offset != w.span_bytes)
      throw CheckpointError("internal error: a vectored read does not match its plan");
    t0.file->preadv_exact(iov_.data(), static_cast<int>(n), offset);
  }

  // Writes destination elements [u.first, +u.count), in the destination dtype, densely to out.
  void produce(const CopyTask& t, const TaskInfo& info, const Unit& u, uint8_t* out) {
    if (info.same_dtype) {
      read_source(t, info, u, out);
      return;
    }
    // Without an index list the unit is one source run: cast straight from the
    // page cache when it holds it; if not, it was asked once and is not asked again.
    const bool one_run = t.rows.kind != RowSelection::Kind::Index;
    const uint64_t src_first = row_start(t, info) + u.first;
    const uint8_t* raw = one_run ? cached_source(t, info, src_first, u.count) : nullptr;
    const bool from_view = raw != nullptr;
    if (!from_view) {
      uint8_t* buffer = src_.get(u.count * info.src_item);
      read_source(t, info, u, buffer, /*try_view=*/!one_run);
      raw = buffer;
    }
    if (info.two_casts) {
      uint8_t* mid = mid_.get(u.count * info.mid_item);
      info.first_cast(raw, mid, u.count);
      info.second_cast(mid, out, u.count);
    } else {
      (stream_cast_ ? info.stream_cast : info.first_cast)(raw, out, u.count);
    }
    if (from_view) copied_from_view(t, info, src_first, u.count);
  }

  static uint64_t row_start(const CopyTask& t, const TaskInfo& info) {
    return t.rows.kind == RowSelection::Kind::Range ? static_cast<uint64_t>(t.rows.start) * info.row_elems
                                                    : 0;
  }

  // Source elements [src_first, +n) in the file's FileView, when the source is
  // dense, the range large enough and all of it in the page cache; else nullptr.
  const uint8_t* cached_source(const CopyTask& t, const TaskInfo& info, uint64_t src_first,
                               uint64_t n) {
    if (!info.src_dense || n * info.src_item < kViewMinBytes) return nullptr;
    FileView* view = e_.view_of(t.file.get());
    if (view == nullptr) return nullptr;
    return view->cached(info.src_start + src_first * info.src_item, n * info.src_item);
  }

  // After reading a cached_source: the bytes are only trustworthy if the file
  // did not shrink meanwhile (the FaultGuard then turned lost pages into zeros).
  void copied_from_view(const CopyTask& t, const TaskInfo& info, uint64_t src_first, uint64_t n) {
    if (t.file->pages_lost()) lost_pages(t);
    e_.bytes_from_cache_.fetch_add(n * info.src_item, std::memory_order_relaxed);
    e_.view_of(t.file.get())->copied_up_to(info.src_start + (src_first + n) * info.src_item);
  }

  [[noreturn]] static void lost_pages(const CopyTask& t) {
    fail(t.file->path(), "the file was truncated or rewritten while it was being read (part of it vanished)");
  }

  // Source elements for destination elements [u.first, +u.count), densely, in the
  // source dtype. `try_view`: cached runs may come from the FileView.
  void read_source(const CopyTask& t, const TaskInfo& info, const Unit& u, uint8_t* out,
                   bool try_view = true) {
    const uint64_t end = u.first + u.count;
    uint64_t pos = u.first;
    while (pos < end) {
      // Source flat position of `pos`, and how many following elements are
      // consecutive in the source too (rows of an index list may be adjacent).
      uint64_t src_first;
      uint64_t run;
      if (t.rows.kind == RowSelection::Kind::Index) {
        uint64_t row = pos / info.row_elems;
        const uint64_t in_row = pos % info.row_elems;
        src_first = static_cast<uint64_t>(t.rows.index[row]) * info.row_elems + in_row;
        run = std::min(end - pos, info.row_elems - in_row);
        while (pos + run < end && t.rows.index[row + 1] == t.rows.index[row] + 1) {
          ++row;
          run += std::min(end - pos - run, info.row_elems);
        }
      } else {
        src_first = row_start(t, info) + pos;
        run = end - pos;
      }
      read_run(t, info, src_first, run, out + (pos - u.first) * info.src_item, try_view);
      pos += run;
    }
  }

  void read_run(const CopyTask& t, const TaskInfo& info, uint64_t src_first, uint64_t n,
                uint8_t* out, bool try_view) {
    const MappedFile& f = *t.file;
    if (info.src_dense) {
      if (const uint8_t* cached = try_view ? cached_source(t, info, src_first, n) : nullptr) {
        if (stream_) {
          copy_streaming(out, cached, n * info.src_item);
        } else {
          std::memcpy(out, cached, n * info.src_item);
        }
        copied_from_view(t, info, src_first, n);
        return;
      }
      // Not cached (or small): pread, whose readahead keeps a cold file streaming
      // from disk, and which never SIGBUSes: a short read names the offset where
      // a shrunken file now ends.
      const uint64_t offset = t.storage_file_offset + (t.src_offset + src_first) * info.src_item;
      const uint64_t nbytes = n * info.src_item;
      if (!stream_) {
        f.pread_exact(out, offset, nbytes);
        return;
      }
      uint8_t* bounce = bounce_.get(e_.bounce_bytes_);
      for (uint64_t done = 0; done < nbytes;) {
        const uint64_t piece = std::min(e_.bounce_bytes_, nbytes - done);
        f.pread_exact(bounce, offset + done, piece);
        copy_streaming(out + done, bounce, piece);
        done += piece;
      }
      return;
    }
    if (e_.options_.exact_reads && info.src_run_elems * info.src_item >= kExactMinRunBytes) {
      read_runs(t, info, src_first, n, out);
      return;
    }
    // Strided sources (views in torch files) are gathered from the mapping:
    // their elements are scattered over the storage, so one read cannot fetch them.
    uint8_t* base = f.data() + t.storage_file_offset + t.src_offset * info.src_item;
    gather(StridedView{base, &t.src_shape, &t.src_strides, info.src_item}, src_first, n, out);
    // The worker's FaultGuard turned a shrinking file's SIGBUS into zeros and this flag.
    if (f.pages_lost()) lost_pages(t);
  }

  // Source elements [src_first, +n) of a strided source, read run by run (its
  // dense trailing dimensions) into `out`; runs less than a page apart in the
  // file share one preadv, the bytes between them landing in scratch.
  void read_runs(const CopyTask& t, const TaskInfo& info, uint64_t src_first, uint64_t n,
                 uint8_t* out) {
    uint8_t* scratch = gap_.get(kExactMaxGap);
    size_t n_iov = 0;
    uint64_t group_start = 0;
    uint64_t group_end = 0;
    const auto flush = [&] {
      if (n_iov > 0) t.file->preadv_exact(iov_.data(), static_cast<int>(n_iov), group_start);
      n_iov = 0;
    };
    iov_.resize(kMaxVectoredIov);
    for_each_run(t, info.src_item, info.src_run_elems, src_first, n,
                 [&](uint64_t offset, uint64_t bytes, uint64_t pos) {
                   const bool joins = n_iov > 0 && offset >= group_end &&
                                      offset - group_end <= kExactMaxGap && n_iov + 2 <= kMaxVectoredIov;
                   if (!joins) {
                     flush();
                     group_start = offset;
                   } else if (offset > group_end) {
                     iov_[n_iov++] = {scratch, static_cast<size_t>(offset - group_end)};
                   }
                   iov_[n_iov++] = {out + (pos - src_first) * info.src_item, static_cast<size_t>(bytes)};
                   group_end = offset + bytes;
                 });
    flush();
  }

  CopyEngine& e_;
  StagingRing* ring_;
  std::vector<struct iovec> iov_;
  bool stream_ = false;  // the current read lands in its final (host) destination
  bool stream_cast_ = false;  // the current cast writes a large final (host) destination
  Buffer bounce_;
  Buffer gap_;
  Buffer src_;
  Buffer mid_;
  Buffer out_;
};

CopyEngine::CopyEngine(std::vector<CopyTask> tasks, EngineOptions options,
                       std::unique_ptr<DeviceSink> sink, std::shared_ptr<const std::string> label_text)
    : tasks_(std::move(tasks)), label_text_(std::move(label_text)), options_(options),
      sink_(std::move(sink)) {
  options_.threads = std::max<size_t>(options_.threads, 1);
  if (options_.max_host_bytes < kMinHostBytes)
    throw CheckpointError("max_host_bytes must be at least 1 MiB, got " +
                          std::to_string(options_.max_host_bytes));
  bool any_device = false;
  for (const auto& t : tasks_) {
    validate_task(t);
    any_device = any_device || t.dst_on_device;
  }
  if (any_device && !sink_) throw CheckpointError("device destinations need a device sink");

  const size_t threads = options_.threads;
  // Device loads split the budget: half the pinned ring, half per-thread staging for casts.
  const uint64_t staging_share = any_device ? options_.max_host_bytes / 2 : options_.max_host_bytes;
  const uint64_t per_thread = std::max<uint64_t>(staging_share / threads, 1);
  const uint64_t slot_bytes = options_.max_host_bytes / 2 / kDeviceSlots;
  bounce_bytes_ = std::min(kBounceBytes, per_thread);

  info_.resize(tasks_.size());
  for (size_t i = 0; i < tasks_.size(); ++i) {
    const CopyTask& t = tasks_[i];
    TaskInfo& in = info_[i];
    for (size_t d = 1; d < t.dst_shape.size(); ++d) in.row_elems *= static_cast<uint64_t>(t.dst_shape[d]);
    in.out_elems = element_count(t.dst_shape);
    in.src_item = dtype_itemsize(t.src_dtype);
    in.dst_item = dtype_itemsize(t.dst_dtype);
    const DType mid = t.via_dtype.value_or(t.src_dtype);
    in.mid_item = dtype_itemsize(mid);
    in.src_dense = is_dense(t.src_shape, t.src_strides);
    for (size_t d = t.src_shape.size(); d-- > 0;) {
      if (t.src_shape[d] != 1 && static_cast<uint64_t>(t.src_strides[d]) != in.src_run_elems) break;
      in.src_run_elems *= static_cast<uint64_t>(t.src_shape[d]);
    }
    in.dst_dense = is_dense(t.dst_shape, t.dst_strides);
    in.same_dtype = t.src_dtype == t.dst_dtype && mid == t.src_dtype;
    in.two_casts = mid != t.src_dtype && mid != t.dst_dtype;
    in.src_start = t.storage_file_offset + t.src_offset * in.src_item;
    in.first_cast = *find_cast(t.src_dtype, in.two_casts ? mid : t.dst_dtype);
    if (in.two_casts) in.second_cast = *find_cast(mid, t.dst_dtype);
    if (!in.same_dtype && !in.two_casts) in.stream_cast = find_streaming_cast(t.src_dtype, t.dst_dtype).value_or(nullptr);
    total_bytes_ += in.out_elems * in.src_item;
  }

  for (uint32_t i : file_order()) {
    const CopyTask& t = tasks_[i];
    const TaskInfo& in = info_[i];
    if (in.out_elems == 0) continue;
    uint64_t unit;
    if (t.dst_on_device) {
      unit = slot_bytes / in.dst_item;
      if (!in.same_dtype)
        unit = std::min(unit, per_thread / (in.src_item + (in.two_casts ? in.mid_item : 0)));
    } else if (in.same_dtype && in.dst_dense) {
      unit = kChunkBytes / in.src_item;  // no staging: straight into the destination
    } else {
      uint64_t per_elem = (in.same_dtype ? 0 : in.src_item) + (in.two_casts ? in.mid_item : 0) +
                          (in.dst_dense ? 0 : in.dst_item);
      unit = std::min(per_thread / per_elem, kChunkBytes / in.src_item);
    }
    unit = std::max<uint64_t>(unit, 1);
    for (uint64_t first = 0; first < in.out_elems; first += unit)
      units_.push_back(Unit{i, first, std::min(unit, in.out_elems - first)});
  }
  plan_work();
}

// Groups units into work items: a unit that is a whole tensor read as it is
// (same dtype, all rows, dense source and host destination) joins the previous
// such item when its bytes start at most kMaxVectoredGap after that item's end
// in the same file.
void CopyEngine::plan_work() {
  uint64_t next_offset = 0;
  const MappedFile* file = nullptr;
  for (size_t k = 0; k < units_.size(); ++k) {
    const Unit& u = units_[k];
    const CopyTask& t = tasks_[u.task];
    const TaskInfo& in = info_[u.task];
    const uint64_t bytes = u.count * in.src_item;
    const bool plain = u.first == 0 && u.count == in.out_elems && in.same_dtype && in.src_dense &&
                       in.dst_dense && !t.dst_on_device && t.rows.kind == RowSelection::Kind::All;
    const uint64_t offset = source_start(u.task);
    Work* last = work_.empty() ? nullptr : &work_.back();
    // Units are in file order, but two tensors may share bytes (views): only a
    // unit that starts at or after the previous one's end extends the read.
    const bool follows = last != nullptr && last->vectored && plain && t.file.get() == file &&
                         offset >= next_offset && offset - next_offset <= kMaxVectoredGap;
    const uint32_t iov = follows && offset > next_offset ? 2 : 1;
    if (follows && last->n_iov + iov <= kMaxVectoredIov &&
        last->span_bytes + (offset - next_offset) + bytes <= kMaxVectoredBytes) {
      ++last->n_units;
      last->n_iov += iov;
      last->src_bytes += bytes;
      last->span_bytes += (offset - next_offset) + bytes;
    } else {
      work_.push_back(Work{static_cast<uint32_t>(k), 1, plain, bytes, 1, bytes});
    }
    file = t.file.get();
    next_offset = offset + bytes;
  }
}

// Task indices in file order (by file path, then source offset; ties keep task
// order) so that reading stays close to sequential. Sorts compact keys: comparing
// through the tasks themselves cost a cache miss per comparison for 30k tasks.
std::vector<uint32_t> CopyEngine::file_order() const {
  std::unordered_map<const MappedFile*, uint32_t> rank;
  std::vector<const MappedFile*> files;
  const MappedFile* last = nullptr;
  for (const auto& t : tasks_) {
    if (t.file.get() == last) continue;  // tasks of one file mostly come together
    last = t.file.get();
    if (rank.emplace(last, 0).second) files.push_back(last);
  }
  std::sort(files.begin(), files.end(),
            [](const MappedFile* a, const MappedFile* b) { return a->path() < b->path(); });
  for (size_t k = 0; k < files.size(); ++k)  // one path opened twice: one rank
    rank[files[k]] = k > 0 && files[k]->path() == files[k - 1]->path() ? rank[files[k - 1]]
                                                                     : static_cast<uint32_t>(k);
  struct Key {
    uint32_t file;
    uint32_t task;
    uint64_t offset;
  };
  std::vector<Key> keys(tasks_.size());
  last = nullptr;
  uint32_t last_rank = 0;
  for (size_t i = 0; i < tasks_.size(); ++i) {
    const MappedFile* f = tasks_[i].file.get();
    if (f != last) {
      last = f;
      last_rank = rank[f];
    }
    keys[i] = Key{last_rank, static_cast<uint32_t>(i), source_start(static_cast<uint32_t>(i))};
  }
  const auto before = [](const Key& a, const Key& b) {
    return a.file != b.file ? a.file < b.file : a.offset != b.offset ? a.offset < b.offset : a.task < b.task;
  };
  if (!std::is_sorted(keys.begin(), keys.end(), before)) std::sort(keys.begin(), keys.end(), before);
  std::vector<uint32_t> order(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) order[i] = keys[i].task;
  return order;
}

uint64_t CopyEngine::source_start(uint32_t task) const { return info_[task].src_start; }

// A FileView for each file with at least one dense source range large enough to
// be read through it (whether it is cached is asked range by range, later).
void CopyEngine::open_views() {
  // Pages stay mapped this far behind the furthest copied byte: every worker's piece in flight.
  const uint64_t keep = (options_.threads + 2) * kChunkBytes;
  std::set<const MappedFile*> tried;
  for (const Unit& u : units_) {
    const TaskInfo& in = info_[u.task];
    const MappedFile* f = tasks_[u.task].file.get();
    if (!in.src_dense || u.count * in.src_item < kViewMinBytes || !tried.insert(f).second) continue;
    if (auto view = FileView::open(*f, keep)) views_.emplace(f, std::move(view));
  }
}

void CopyEngine::prefetch_exact_ranges(const std::atomic<bool>& stop) const {
  const MappedFile* file = nullptr;
  uint64_t start = 0;
  uint64_t end = 0;
  const auto flush = [&] {
    if (file != nullptr && end > start) file->advise_willneed(start, end - start);
  };
  // Bytes [at, +bytes) of `f`, in file order within a file: joined to the range
  // being built while no whole page lies between them (the pages asked are the same).
  const auto ask = [&](const MappedFile* f, uint64_t at, uint64_t bytes) {
    if (f == file && at >= start && at <= end + kExactMaxGap) {
      end = std::max(end, at + bytes);
      return;
    }
    flush();
    file = f;
    start = at;
    end = at + bytes;
  };
  for (const Unit& u : units_) {
    if (stop.load(std::memory_order_relaxed)) return;
    const CopyTask& t = tasks_[u.task];
    const TaskInfo& in = info_[u.task];
    if (t.rows.kind == RowSelection::Kind::Index) continue;
    const uint64_t first = (t.rows.kind == RowSelection::Kind::Range
                                ? static_cast<uint64_t>(t.rows.start) * in.row_elems
                                : 0) + u.first;
    if (in.src_dense) {
      ask(t.file.get(), in.src_start + first * in.src_item, u.count * in.src_item);
    } else if (in.src_run_elems * in.src_item >= kExactMinRunBytes) {
      // A rank's columns of a row-major chunk: without this, read_runs' preads
      // (no readahead: advise_random) would each wait for the disk in turn; asked
      // here, the kernel has them all in flight at once (65k 8 KiB runs, cold
      // 1 GB file: 7.7 s of single preads against 0.8-1.0 s).
      for_each_run(t, in.src_item, in.src_run_elems, first, u.count,
                   [&](uint64_t at, uint64_t bytes, uint64_t) { ask(t.file.get(), at, bytes); });
    }
  }
  flush();
}

FileView* CopyEngine::view_of(const MappedFile* file) const {
  auto it = views_.find(file);
  return it == views_.end() ? nullptr : it->second.get();
}

CopyEngine::~CopyEngine() = default;

void CopyEngine::run() {
  if (ran_) throw CheckpointError("a copy job runs only once");
  ran_ = true;
  std::set<const MappedFile*> files;
  for (const auto& t : tasks_) {
    if (!files.insert(t.file.get()).second) continue;
    if (options_.exact_reads) {
      t.file->advise_random();
    } else {
      t.file->advise_sequential(0, 0);
    }
  }

  // The kernel is asked for the exact ranges from a thread of its own: the copy
  // starts on the first pages while the rest are still being asked for (asking
  // blocks once the device's queue is full). Stopped and joined however run() ends.
  std::atomic<bool> stop_prefetch{false};
  std::thread prefetcher;
  if (options_.exact_reads) prefetcher = std::thread([&] { prefetch_exact_ranges(stop_prefetch); });
  struct JoinPrefetch {
    std::thread& thread;
    std::atomic<bool>& stop;
    ~JoinPrefetch() {
      stop = true;
      if (thread.joinable()) thread.join();
    }
  } join_prefetch{prefetcher, stop_prefetch};
  open_views();
  struct CloseViews {  // unmapped as soon as the job ends, however it ends
    std::unordered_map<const MappedFile*, std::unique_ptr<FileView>>& views;
    ~CloseViews() { views.clear(); }
  } close_views{views_};

  std::unique_ptr<StagingRing> ring;
  if (sink_) ring = std::make_unique<StagingRing>(*sink_, kDeviceSlots,
                                                  options_.max_host_bytes / 2 / kDeviceSlots);
  const size_t threads = std::min<size_t>(options_.threads, std::max<size_t>(work_.size(), 1));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  ThreadPool pool(threads);
  pool.run_on_all([&](size_t) {
    if (sink_) sink_->bind_thread();
    // Guards nest per thread and must end innermost first: destroyed back to front.
    std::vector<std::unique_ptr<FaultGuard>> guards;
    for (const MappedFile* f : files) guards.push_back(std::make_unique<FaultGuard>(*f));
    for (const auto& [f, view] : views_)
      guards.push_back(std::make_unique<FaultGuard>(*f, view->data(), view->size()));
    struct Unwind {
      std::vector<std::unique_ptr<FaultGuard>>& g;
      ~Unwind() {
        while (!g.empty()) g.pop_back();
      }
    } unwind{guards};
    Worker worker(*this, ring.get());
    try {
      for (size_t k; !failed.load(std::memory_order_relaxed) &&
                     (k = next.fetch_add(1, std::memory_order_relaxed)) < work_.size();) {
        worker.process(work_[k]);
      }
    } catch (...) {
      failed = true;
      throw;
    }
  });
  // Only now is every byte on the device; the ring's destructor waits again on error paths.
  if (sink_) sink_->synchronize();
}

}  // namespace fastckpt
