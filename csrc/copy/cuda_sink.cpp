// The CUDA runtime entry points we need, resolved with dlsym from the library
// torch already loaded, so one CUDA context is shared with torch and the build
// needs no CUDA headers. Signatures follow cuda_runtime_api.h (int = cudaError_t).
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <vector>

#include "common/error.h"
#include "copy/device_sink.h"

namespace fastckpt {
namespace {

using Stream = void*;
using Event = void*;
constexpr unsigned kStreamNonBlocking = 0x01;
constexpr unsigned kEventDisableTiming = 0x02;
constexpr int kMemcpyHostToDevice = 1;

struct CudaApi {
  int (*SetDevice)(int);
  int (*StreamCreateWithFlags)(Stream*, unsigned);
  int (*StreamDestroy)(Stream);
  int (*StreamSynchronize)(Stream);
  int (*EventCreateWithFlags)(Event*, unsigned);
  int (*EventDestroy)(Event);
  int (*EventRecord)(Event, Stream);
  int (*EventSynchronize)(Event);
  int (*MemcpyAsync)(void*, const void*, size_t, int, Stream);
  int (*HostAlloc)(void**, size_t, unsigned);
  int (*FreeHost)(void*);
  const char* (*GetErrorString)(int);
};

template <typename F>
void resolve(void* lib, const std::string& path, const char* name, F*& out) {
  void* sym = ::dlsym(lib, name);
  if (sym == nullptr) fail(path, std::string("CUDA runtime has no symbol ") + name);
  out = reinterpret_cast<F*>(sym);
}

class CudaSink final : public DeviceSink {
 public:
  CudaSink(const std::string& path, int device, size_t slots) : path_(path), device_(device) {
    // RTLD_NOLOAD first: we want torch's copy of the runtime, not a second one.
    lib_ = ::dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib_ == nullptr) lib_ = ::dlopen(path.c_str(), RTLD_NOW);
    if (lib_ == nullptr) fail(path, std::string("cannot load the CUDA runtime: ") + ::dlerror());
    resolve(lib_, path, "cudaSetDevice", api_.SetDevice);
    resolve(lib_, path, "cudaStreamCreateWithFlags", api_.StreamCreateWithFlags);
    resolve(lib_, path, "cudaStreamDestroy", api_.StreamDestroy);
    resolve(lib_, path, "cudaStreamSynchronize", api_.StreamSynchronize);
    resolve(lib_, path, "cudaEventCreateWithFlags", api_.EventCreateWithFlags);
    resolve(lib_, path, "cudaEventDestroy", api_.EventDestroy);
    resolve(lib_, path, "cudaEventRecord", api_.EventRecord);
    resolve(lib_, path, "cudaEventSynchronize", api_.EventSynchronize);
    resolve(lib_, path, "cudaMemcpyAsync", api_.MemcpyAsync);
    resolve(lib_, path, "cudaHostAlloc", api_.HostAlloc);
    resolve(lib_, path, "cudaFreeHost", api_.FreeHost);
    resolve(lib_, path, "cudaGetErrorString", api_.GetErrorString);
    check(api_.SetDevice(device_), "cudaSetDevice");
    check(api_.StreamCreateWithFlags(&stream_, kStreamNonBlocking), "cudaStreamCreateWithFlags");
    events_.resize(slots, nullptr);
    for (auto& e : events_) check(api_.EventCreateWithFlags(&e, kEventDisableTiming), "cudaEventCreate");
  }

  ~CudaSink() override {
    if (stream_ != nullptr) api_.StreamSynchronize(stream_);
    for (Event e : events_)
      if (e != nullptr) api_.EventDestroy(e);
    if (stream_ != nullptr) api_.StreamDestroy(stream_);
    // lib_ stays loaded: torch holds it too, and unloading a CUDA runtime is never safe.
  }

  void* alloc_host(size_t nbytes) override {
    void* p = nullptr;
    check(api_.HostAlloc(&p, nbytes ? nbytes : 1, 0), "cudaHostAlloc");
    return p;
  }
  void free_host(void* p) noexcept override { api_.FreeHost(p); }
  void bind_thread() override { check(api_.SetDevice(device_), "cudaSetDevice"); }

  void copy_async(void* dst, const void* src, size_t nbytes, size_t slot) override {
    // One stream shared by the workers; the runtime serialises calls on it.
    check(api_.MemcpyAsync(dst, src, nbytes, kMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    check(api_.EventRecord(events_.at(slot), stream_), "cudaEventRecord");
  }
  void wait_slot(size_t slot) override {
    check(api_.EventSynchronize(events_.at(slot)), "cudaEventSynchronize");
  }
  void synchronize() override { check(api_.StreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  void check(int rc, const char* what) const {
    if (rc != 0)
      fail(path_, std::string(what) + " failed on cuda:" + std::to_string(device_) + ": " +
                      api_.GetErrorString(rc));
  }

  std::string path_;
  int device_;
  void* lib_ = nullptr;
  CudaApi api_{};
  Stream stream_ = nullptr;
  std::vector<Event> events_;
};

}  // namespace

std::unique_ptr<DeviceSink> make_cuda_sink(const std::string& libcudart_path, int device,
                                           size_t slots) {
  return std::make_unique<CudaSink>(libcudart_path, device, slots);
}

}  // namespace fastckpt
