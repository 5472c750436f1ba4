// A fixed set of worker threads owned by one object. run_on_all() hands the
// same body to every worker and returns when all of them are done.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fastckpt {

class ThreadPool {
 public:
  explicit ThreadPool(size_t threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return workers_.size(); }

  // Calls body(worker_index) once on every worker and waits for all of them.
  // The first exception thrown by any worker is rethrown here.
  void run_on_all(const std::function<void(size_t)>& body);

 private:
  void worker_loop(size_t index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  const std::function<void(size_t)>* body_ = nullptr;
  size_t generation_ = 0;
  size_t running_ = 0;
  bool stopping_ = false;
  std::exception_ptr first_error_;
};

}  // namespace fastckpt
