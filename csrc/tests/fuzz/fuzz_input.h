// Shared by the libFuzzer targets: the input becomes a real file (a memfd, so
// no disk traffic) opened through MappedFile, exactly as users' files are.
// CheckpointError is the expected outcome for bad input; any other exception
// escapes and libFuzzer reports it as a crash, like sanitizer findings.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.h"
#include "io/mapped_file.h"
#include "../touch_index.h"

namespace fastckpt::fuzzing {

inline std::shared_ptr<MappedFile> input_file(const uint8_t* data, size_t size) {
  static const int fd = ::memfd_create("fastckpt_fuzz", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ::ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  return MappedFile::open(path);
}

// Runs `read(file)` on the input; a returned index is validated and every byte
// it names is read.
template <class Read>
int run_reader(const uint8_t* data, size_t size, Read&& read) {
  try {
    auto index = read(input_file(data, size));
    testing::touch_index(index);
  } catch (const CheckpointError&) {
  }
  return 0;
}

}  // namespace fastckpt::fuzzing
