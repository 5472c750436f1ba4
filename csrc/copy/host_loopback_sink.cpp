#include <cstdlib>
#include <cstring>
#include <new>

#include "copy/device_sink.h"

namespace fastckpt {
namespace {

class HostLoopbackSink final : public DeviceSink {
 public:
  void* alloc_host(size_t nbytes) override {
    void* p = std::malloc(nbytes ? nbytes : 1);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  void free_host(void* p) noexcept override { std::free(p); }
  void bind_thread() override {}
  void copy_async(void* dst, const void* src, size_t nbytes, size_t /*slot*/) override {
    std::memcpy(dst, src, nbytes);
  }
  void wait_slot(size_t /*slot*/) override {}
  void synchronize() override {}
};

}  // namespace

std::unique_ptr<DeviceSink> make_host_loopback_sink() {
  return std::make_unique<HostLoopbackSink>();
}

}  // namespace fastckpt
