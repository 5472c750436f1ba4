// Tests of the fault guard (io/fault_guard.h): a file that shrinks while a
// reader parses it from the mapping gives CheckpointError, not SIGBUS, and a
// SIGBUS outside any guard still kills the process as before.
#include "io/fault_guard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <string>
#include <thread>

#include "formats/open_checkpoint.h"
#include "formats/safetensors_reader.h"
#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

namespace {

// A valid safetensors file whose header is padded (inside __metadata__) to
// `header_bytes`, so parsing it touches many pages.
std::string big_safetensors(size_t header_bytes) {
  std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"pad":")";
  const std::string tail = "\"}}";
  if (header_bytes > header.size() + tail.size()) header.append(header_bytes - header.size() - tail.size(), 'x');
  header += tail;
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(8, '\0');
}

void truncate_file(const std::string& path, off_t size) {
  if (::truncate(path.c_str(), size) != 0) std::abort();
}

}  // namespace

FASTCKPT_TEST(test_truncated_before_parse) {
  const std::string path = temp_file(big_safetensors(4 << 20));
  auto file = MappedFile::open(path);
  truncate_file(path, 16);  // every header page past the first is gone now
  const std::string msg = error_of([&] { guarded_read(file, read_safetensors); });
  expect(contains(msg, "truncated or rewritten while it was being read"),
         "header truncated after mmap: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

FASTCKPT_TEST(test_reader_that_succeeds_on_zeros_still_fails) {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
  auto file = MappedFile::open(path);
  const std::string msg = error_of([&] {
    guarded_read(file, [&](const std::shared_ptr<MappedFile>& f) {
      truncate_file(path, 0);
      const volatile uint8_t* last = f->data() + f->size() - 1;
      return static_cast<int>(*last);  // faults, reads the zero page
    });
  });
  expect(contains(msg, "truncated or rewritten"),
         "reader that returns normally after a fault: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

FASTCKPT_TEST(test_shrink_without_touching) {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
  auto file = MappedFile::open(path);
  const std::string msg = error_of([&] {
    guarded_read(file, [&](const std::shared_ptr<MappedFile>&) {
      truncate_file(path, 100);
      return 0;
    });
  });
  expect(contains(msg, "shrank from 12288 to 100 bytes"),
         "file shrunk after the last page was read: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

FASTCKPT_TEST(test_truncated_by_another_thread_while_parsing) {
  // Races a truncating thread against the parse of a 64 MB header. Whatever the
  // timing, the outcome is success (truncated after open) or CheckpointError.
  const std::string content = big_safetensors(64 << 20);
  int errors = 0, successes = 0;
  for (int round = 0; round < 6; ++round) {
    const std::string path = temp_file(content);
    std::thread cutter([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(5 + 15 * round));
      truncate_file(path, 4096);
    });
    try {
      open_checkpoint_file(path);
      ++successes;
    } catch (const CheckpointError&) {
      ++errors;
    }
    cutter.join();
    ::unlink(path.c_str());
  }
  expect(errors + successes == 6, "concurrent truncation: " + std::to_string(errors) +
                                      " CheckpointError, " + std::to_string(successes) +
                                      " opened before the cut, no crash");
}

FASTCKPT_TEST(test_unguarded_sigbus_still_kills) {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
  {
    // Installs our handler (whatever ran before): a fault outside any guard
    // must then reach the default action, not be swallowed.
    auto file = MappedFile::open(path);
    FaultGuard guard(*file);
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    // A sanitizer build reports the (expected) fault; keep that report out of the log.
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 2);
    int fd = ::open(path.c_str(), O_RDONLY);
    auto* p = static_cast<volatile char*>(::mmap(nullptr, 3 * 4096, PROT_READ, MAP_PRIVATE, fd, 0));
    truncate_file(path, 0);
    char c = p[2 * 4096];
    std::_Exit(c == 0 ? 3 : 4);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  // Plain build: killed by SIGBUS. Sanitizer build: the sanitizer's own SIGBUS
  // handler (which we chain to) reports it and exits non-zero.
  const bool survived = WIFEXITED(status) && (WEXITSTATUS(status) == 3 || WEXITSTATUS(status) == 4);
  const bool died = WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0);
  expect(died && !survived,
         "SIGBUS outside a guard still terminates (status " + std::to_string(status) + ")");
  ::unlink(path.c_str());

  // A SIGBUS sent by kill/raise (no faulting load to restart) is not swallowed either.
  pid = ::fork();
  if (pid == 0) {
    int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 2);
    ::raise(SIGBUS);
    std::_Exit(3);
  }
  ::waitpid(pid, &status, 0);
  const bool raised_died = WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 3 &&
                                                   WEXITSTATUS(status) != 0);
  expect(raised_died, "raise(SIGBUS) still terminates (status " + std::to_string(status) + ")");
}
