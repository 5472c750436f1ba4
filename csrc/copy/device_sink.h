// Where staged bytes go when the destination lives on an accelerator. The
// engine fills host staging slots; a sink copies each slot to the device
// asynchronously and tells when a slot may be refilled.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

namespace fastckpt {

// Staging slots of a device load: the engine's ring and the CUDA sink's events agree on it.
constexpr size_t kDeviceSlots = 4;

class DeviceSink {
 public:
  virtual ~DeviceSink() = default;
  // Page-locked (pinned) host memory for staging slots.
  virtual void* alloc_host(size_t nbytes) = 0;
  virtual void free_host(void* p) noexcept = 0;
  // Called once on every worker thread before it issues copies.
  virtual void bind_thread() = 0;
  // Queues the copy of slot `slot`'s bytes to `dst` and marks the slot busy.
  virtual void copy_async(void* dst, const void* src, size_t nbytes, size_t slot) = 0;
  // Blocks until the last copy queued from `slot` has finished.
  virtual void wait_slot(size_t slot) = 0;
  // Blocks until every queued copy has finished.
  virtual void synchronize() = 0;
};

// The CUDA runtime the process has already loaded (torch's libcudart), found by
// its path and opened with dlopen: the build needs no CUDA. `slots` events are
// created, one per staging slot; copies go on one non-blocking stream.
std::unique_ptr<DeviceSink> make_cuda_sink(const std::string& libcudart_path, int device,
                                           size_t slots);

// Host memory standing in for a device: copies are plain memcpy. It lets the
// staging ring be tested on machines without an accelerator.
std::unique_ptr<DeviceSink> make_host_loopback_sink();

}  // namespace fastckpt
