// A stand-in for libcudart, for testing fastckpt's CUDA sink (csrc/copy/cuda_sink.cpp)
// on machines without a GPU: the 14 entry points the sink resolves, over host
// memory. "Device" pointers are host pointers. Each stream has a thread that runs
// its copies in order and late (a short sleep first, reading the source only
// then), so a staging slot refilled before its event completed shows up as wrong
// bytes. Calls can be made to fail (fake_fail), and the live streams, events and
// pinned blocks are counted (fake_stats) so tests can check nothing leaks.
// Built by tests/test_cuda_sink_fake.py; not part of the package.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace {

constexpr int kDevices = 2;
constexpr int kErrorInvalidValue = 1;
constexpr int kErrorInvalidDevice = 101;

std::atomic<int> live_streams{0}, live_events{0}, live_host{0};
thread_local int current_device = 0;
thread_local int last_error = 0;

std::mutex fail_mutex;
std::string fail_name;  // the call to fail, and on which of its calls (1-based)
int fail_nth = 0;
int fail_seen = 0;

// rc for a call named `name`: a failure if it is the one chosen; sticky like CUDA's.
int outcome(const char* name, int rc = 0) {
  {
    std::lock_guard<std::mutex> lock(fail_mutex);
    if (rc == 0 && fail_nth > 0 && fail_name == name && ++fail_seen == fail_nth) rc = kErrorInvalidValue;
  }
  if (rc != 0) last_error = rc;
  return rc;
}

struct Stream {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  unsigned long long queued = 0, done = 0;
  bool stop = false;
  std::thread worker{[this] { run(); }};

  ~Stream() {
    {
      std::lock_guard<std::mutex> lock(m);
      stop = true;
    }
    cv.notify_all();
    worker.join();
  }
  void run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(m);
        cv.wait(lock, [&] { return stop || !queue.empty(); });
        if (queue.empty()) return;
        job = std::move(queue.front());
        queue.pop_front();
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      job();
      {
        std::lock_guard<std::mutex> lock(m);
        ++done;
      }
      cv.notify_all();
    }
  }
  unsigned long long push(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(m);
    queue.push_back(std::move(job));
    cv.notify_all();
    return ++queued;
  }
  unsigned long long mark() {
    std::lock_guard<std::mutex> lock(m);
    return queued;
  }
  void wait_for(unsigned long long n) {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return done >= n; });
  }
};

struct Event {
  Stream* stream = nullptr;
  unsigned long long at = 0;
};

}  // namespace

extern "C" {

// -- test controls ----------------------------------------------------------
void fake_fail(const char* name, int nth) {
  std::lock_guard<std::mutex> lock(fail_mutex);
  fail_name = name ? name : "";
  fail_nth = nth;
  fail_seen = 0;
}
// {live streams, live events, live pinned blocks}
void fake_stats(int* out) {
  out[0] = live_streams.load();
  out[1] = live_events.load();
  out[2] = live_host.load();
}
int fake_peek_last_error() { return last_error; }

// -- the runtime API (signatures as in cuda_runtime_api.h; int = cudaError_t) --
int cudaGetDevice(int* device) {
  *device = current_device;
  return outcome("cudaGetDevice");
}
int cudaSetDevice(int device) {
  if (device < 0 || device >= kDevices) return outcome("cudaSetDevice", kErrorInvalidDevice);
  const int rc = outcome("cudaSetDevice");
  if (rc == 0) current_device = device;
  return rc;
}
int cudaStreamCreateWithFlags(void** stream, unsigned) {
  if (int rc = outcome("cudaStreamCreateWithFlags")) return rc;
  *stream = new Stream();
  ++live_streams;
  return 0;
}
int cudaStreamDestroy(void* stream) {
  if (int rc = outcome("cudaStreamDestroy")) return rc;
  delete static_cast<Stream*>(stream);  // runs what is queued first, as CUDA does
  --live_streams;
  return 0;
}
int cudaStreamSynchronize(void* stream) {
  auto* s = static_cast<Stream*>(stream);
  s->wait_for(s->mark());
  return outcome("cudaStreamSynchronize");
}
int cudaEventCreateWithFlags(void** event, unsigned) {
  if (int rc = outcome("cudaEventCreateWithFlags")) return rc;
  *event = new Event();
  ++live_events;
  return 0;
}
int cudaEventDestroy(void* event) {
  delete static_cast<Event*>(event);
  --live_events;
  return outcome("cudaEventDestroy");
}
int cudaEventRecord(void* event, void* stream) {
  if (int rc = outcome("cudaEventRecord")) return rc;
  auto* e = static_cast<Event*>(event);
  e->stream = static_cast<Stream*>(stream);
  e->at = e->stream->mark();
  return 0;
}
int cudaEventSynchronize(void* event) {
  auto* e = static_cast<Event*>(event);
  if (e->stream != nullptr) e->stream->wait_for(e->at);
  return outcome("cudaEventSynchronize");
}
int cudaMemcpyAsync(void* dst, const void* src, size_t n, int kind, void* stream) {
  if (kind != 1) return outcome("cudaMemcpyAsync", kErrorInvalidValue);  // host to device only
  if (int rc = outcome("cudaMemcpyAsync")) return rc;
  static_cast<Stream*>(stream)->push([=] { std::memcpy(dst, src, n); });
  return 0;
}
int cudaHostAlloc(void** p, size_t n, unsigned) {
  if (int rc = outcome("cudaHostAlloc")) return rc;
  *p = std::malloc(n);
  ++live_host;
  return 0;
}
int cudaFreeHost(void* p) {
  std::free(p);
  --live_host;
  return outcome("cudaFreeHost");
}
int cudaGetLastError() {
  const int rc = last_error;
  last_error = 0;
  return rc;
}
const char* cudaGetErrorString(int rc) {
  return rc == kErrorInvalidDevice ? "invalid device ordinal" : "fake failure";
}

}  // extern "C"
