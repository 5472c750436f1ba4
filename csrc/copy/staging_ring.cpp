#include "copy/staging_ring.h"

#include <cstdint>

namespace fastckpt {

StagingRing::StagingRing(DeviceSink& sink, size_t slots, size_t slot_bytes)
    : sink_(sink), slot_bytes_(slot_bytes) {
  memory_.reserve(slots);
  try {
    for (size_t i = 0; i < slots; ++i) {
      memory_.push_back(sink_.alloc_host(slot_bytes));
      free_.push_back(i);
    }
  } catch (...) {
    for (void* p : memory_) sink_.free_host(p);
    throw;
  }
}

StagingRing::~StagingRing() {
  // Copies may still read the slots: wait before handing the memory back.
  try {
    sink_.synchronize();
  } catch (...) {
  }
  for (void* p : memory_) sink_.free_host(p);
}

size_t StagingRing::acquire() {
  size_t s;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    free_cv_.wait(lock, [this] { return !free_.empty(); });
    s = free_.front();
    free_.pop_front();
  }
  try {
    sink_.wait_slot(s);
  } catch (...) {
    // Back into the ring: a lost slot leaves other workers waiting in acquire forever.
    release(s);
    throw;
  }
  return s;
}

void StagingRing::release(size_t slot) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(slot);
  }
  free_cv_.notify_one();
}

}  // namespace fastckpt
