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
  int (*GetDevice)(int*);
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
  int (*GetLastError)();
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
    resolve(lib_, path, "cudaGetDevice", api_.GetDevice);
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
    resolve(lib_, path, "cudaGetLastError", api_.GetLastError);
    resolve(lib_, path, "cudaGetErrorString", api_.GetErrorString);
    // The stream and events belong to device_; the caller's thread gets its device back.
    OnDevice on(*this);
    check(on.rc(), "cudaSetDevice");
    try {
      check(api_.StreamCreateWithFlags(&stream_, kStreamNonBlocking), "cudaStreamCreateWithFlags");
      events_.resize(slots, nullptr);
      for (auto& e : events_) check(api_.EventCreateWithFlags(&e, kEventDisableTiming), "cudaEventCreateWithFlags");
    } catch (...) {
      release();  // no destructor runs for a constructor that throws
      throw;
    }
  }

  ~CudaSink() override {
    OnDevice on(*this);
    release();
    // lib_ stays loaded: torch holds it too, and unloading a CUDA runtime is never safe.
  }

  void* alloc_host(size_t nbytes) override {
    // With device_ current: the caller's thread (a fresh one, for a progress
    // bar) may be on another device, or on one without a context yet.
    OnDevice on(*this);
    check(on.rc(), "cudaSetDevice");
    void* p = nullptr;
    check(api_.HostAlloc(&p, nbytes ? nbytes : 1, 0), "cudaHostAlloc");
    return p;
  }
  void free_host(void* p) noexcept override {
    OnDevice on(*this);
    if (api_.FreeHost(p) != 0) api_.GetLastError();
  }
  // Worker threads are the engine's own and end with the run: no device to restore.
  void bind_thread() override { check(api_.SetDevice(device_), "cudaSetDevice"); }

  void copy_async(void* dst, const void* src, size_t nbytes, size_t slot) override {
    // One stream shared by the workers; the runtime serialises calls on it.
    check(api_.MemcpyAsync(dst, src, nbytes, kMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    const int rc = api_.EventRecord(events_.at(slot), stream_);
    // The copy is queued but the slot's event does not cover it: wait for it
    // here, or the ring would hand the slot out while the copy still reads it.
    if (rc != 0) api_.StreamSynchronize(stream_);
    check(rc, "cudaEventRecord");
  }
  void wait_slot(size_t slot) override {
    check(api_.EventSynchronize(events_.at(slot)), "cudaEventSynchronize");
  }
  void synchronize() override { check(api_.StreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  // Makes device_ current on the calling thread for a scope, then puts back the
  // caller's device: the constructor, the ring's pinned memory and the
  // destructor run on the caller's thread, whose current device torch relies on.
  class OnDevice {
   public:
    explicit OnDevice(const CudaSink& sink) : s_(sink) {
      rc_ = s_.api_.GetDevice(&prev_);
      if (rc_ == 0 && prev_ != s_.device_) rc_ = s_.api_.SetDevice(s_.device_);
      if (rc_ != 0) s_.api_.GetLastError();  // reported through rc(), or dropped
    }
    ~OnDevice() {
      int now = -1;
      if (prev_ >= 0 && s_.api_.GetDevice(&now) == 0 && now != prev_ && s_.api_.SetDevice(prev_) != 0)
        s_.api_.GetLastError();
    }
    OnDevice(const OnDevice&) = delete;
    OnDevice& operator=(const OnDevice&) = delete;
    int rc() const { return rc_; }

   private:
    const CudaSink& s_;
    int prev_ = -1;
    int rc_ = 0;
  };

  // Waits for queued copies and destroys the stream and events; errors are dropped.
  void release() noexcept {
    bool failed = false;
    if (stream_ != nullptr && api_.StreamSynchronize(stream_) != 0) failed = true;
    for (Event& e : events_) {
      if (e != nullptr && api_.EventDestroy(e) != 0) failed = true;
      e = nullptr;
    }
    if (stream_ != nullptr && api_.StreamDestroy(stream_) != 0) failed = true;
    stream_ = nullptr;
    if (failed) api_.GetLastError();
  }

  void check(int rc, const char* what) const {
    if (rc == 0) return;
    // The runtime also keeps the error as this thread's last error: clear it, or
    // torch's next launch check on this (the Python) thread would report it as its own.
    api_.GetLastError();
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
