#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <vector>

#include "copy/device_sink.h"

namespace fastckpt {
namespace {

// Copies run late, as on a device: queued in order like one stream, and done
// only when their slot is waited for or the sink synchronised. A slot refilled
// before its copy ran, or a run that returns before synchronising, then shows
// up as wrong bytes in the destination instead of passing by luck.
class HostLoopbackSink final : public DeviceSink {
 public:
  void* alloc_host(size_t nbytes) override {
    void* p = std::malloc(nbytes ? nbytes : 1);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void free_host(void* p) noexcept override { std::free(p); }
  void bind_thread() override {}
  void copy_async(void* dst, const void* src, size_t nbytes, size_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(Copy{dst, src, nbytes});
    if (marks_.size() <= slot) marks_.resize(slot + 1, 0);
    marks_[slot] = done_ + queue_.size();
  }
  void wait_slot(size_t slot) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (slot < marks_.size()) run_until(marks_[slot]);
  }
  void synchronize() override {
    std::lock_guard<std::mutex> lock(mutex_);
    run_until(done_ + queue_.size());
  }

 private:
  struct Copy {
    void* dst;
    const void* src;
    size_t nbytes;
  };

  // Runs queued copies, oldest first, until `n` copies have run in all.
  void run_until(uint64_t n) {
    for (; done_ < n; ++done_) {
      const Copy& c = queue_.front();
      std::memcpy(c.dst, c.src, c.nbytes);
      queue_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Copy> queue_;
  std::vector<uint64_t> marks_;  // per slot: copies that must have run before it is reused
  uint64_t done_ = 0;            // copies run so far
};

}  // namespace

std::unique_ptr<DeviceSink> make_host_loopback_sink() {
  return std::make_unique<HostLoopbackSink>();
}

}  // namespace fastckpt
