// A small ring of pinned host slots shared by the workers when the destination
// is on a device: a worker takes a free slot, fills it, queues its copy to the
// device and gives it back; the slot is reused once that copy has finished.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "copy/device_sink.h"

namespace fastckpt {

class StagingRing {
 public:
  StagingRing(DeviceSink& sink, size_t slots, size_t slot_bytes);
  ~StagingRing();
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  size_t slot_bytes() const { return slot_bytes_; }
  uint8_t* slot(size_t i) const { return static_cast<uint8_t*>(memory_[i]); }

  // A slot whose previous copy to the device has finished.
  size_t acquire();
  void release(size_t slot);

 private:
  DeviceSink& sink_;
  size_t slot_bytes_;
  std::vector<void*> memory_;
  std::mutex mutex_;
  std::condition_variable free_cv_;
  std::deque<size_t> free_;
};

}  // namespace fastckpt
