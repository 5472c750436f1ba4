// Native tests of the fault guard (io/fault_guard.h): a file that shrinks while
// a reader parses it from the mapping gives CheckpointError, not SIGBUS, and a
// SIGBUS outside any guard still kills the process as before. Also the readers'
// flat name map (common/flat_string_map.h) against std::unordered_map.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/dims.h"
#include "common/error.h"
#include "common/flat_string_map.h"
#include "formats/open_checkpoint.h"
#include "formats/safetensors_reader.h"
#include "io/fault_guard.h"
#include "io/file_view.h"

using namespace fastckpt;

namespace {

int g_failures = 0;

void expect(bool cond, const std::string& what) {
  std::printf("%s %s\n", cond ? "PASS" : "FAIL", what.c_str());
  if (!cond) ++g_failures;
}

std::string temp_file(const std::string& content) {
  char name[] = "/tmp/fastckpt_native_XXXXXX";
  int fd = ::mkstemp(name);
  if (fd < 0) std::abort();
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return name;
}

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

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "";
}

void test_truncated_before_parse() {
  const std::string path = temp_file(big_safetensors(4 << 20));
  auto file = MappedFile::open(path);
  truncate_file(path, 16);  // every header page past the first is gone now
  const std::string msg = error_of([&] { guarded_read(file, read_safetensors); });
  expect(msg.find("truncated or rewritten while it was being read") != std::string::npos,
         "header truncated after mmap: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

void test_reader_that_succeeds_on_zeros_still_fails() {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
  auto file = MappedFile::open(path);
  const std::string msg = error_of([&] {
    guarded_read(file, [&](const std::shared_ptr<MappedFile>& f) {
      truncate_file(path, 0);
      const volatile uint8_t* last = f->data() + f->size() - 1;
      return static_cast<int>(*last);  // faults, reads the zero page
    });
  });
  expect(msg.find("truncated or rewritten") != std::string::npos,
         "reader that returns normally after a fault: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

void test_shrink_without_touching() {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
  auto file = MappedFile::open(path);
  const std::string msg = error_of([&] {
    guarded_read(file, [&](const std::shared_ptr<MappedFile>&) {
      truncate_file(path, 100);
      return 0;
    });
  });
  expect(msg.find("shrank from 12288 to 100 bytes") != std::string::npos,
         "file shrunk after the last page was read: CheckpointError (" + msg + ")");
  ::unlink(path.c_str());
}

void test_truncated_by_another_thread_while_parsing() {
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

void test_unguarded_sigbus_still_kills() {
  // Our handler is installed by now; a fault outside any guard must reach the
  // default action (the process dies of SIGBUS), not be swallowed.
  const std::string path = temp_file(std::string(3 * 4096, 'a'));
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

// Random inserts (many repeated keys, growth from empty and from a reserve)
// and lookups of present and absent keys agree with std::unordered_map.
void test_flat_string_map_matches_unordered_map() {
  std::mt19937 rng(7);
  std::vector<std::string> keys;
  for (int i = 0; i < 5000; ++i) keys.push_back("layers." + std::to_string(rng() % 3000) + ".w");
  keys.push_back("");
  bool same = true;
  for (size_t reserve : {size_t{0}, size_t{10}, keys.size()}) {
    FlatStringMap flat(reserve);
    std::unordered_map<std::string_view, uint32_t> ref;
    for (size_t i = 0; i < keys.size(); ++i) {
      const auto got = flat.emplace(keys[i], static_cast<uint32_t>(i));
      const auto want = ref.emplace(keys[i], static_cast<uint32_t>(i));
      same = same && got.second == want.second && got.first == want.first->second;
    }
    same = same && flat.size() == ref.size();
    for (int i = 0; i < 6000; ++i) {
      const std::string probe = "layers." + std::to_string(i) + ".w";
      const uint32_t* got = flat.find(probe);
      auto want = ref.find(probe);
      same = same && (got == nullptr) == (want == ref.end()) && (got == nullptr || *got == want->second);
    }
    flat.clear();
    same = same && flat.size() == 0 && flat.find(keys[0]) == nullptr;
  }
  expect(same, "FlatStringMap agrees with std::unordered_map");
}

// Dims keeps up to 4 values in place and more on the heap; copies, assignments,
// fills and writes in place across that boundary (both ways) keep the values.
void test_dims_inline_and_heap() {
  bool same = true;
  for (size_t a = 0; a <= 7; ++a) {
    for (size_t b = 0; b <= 7; ++b) {
      std::vector<int64_t> va(a), vb(b);
      for (size_t i = 0; i < a; ++i) va[i] = static_cast<int64_t>(i * 3 + 1);
      for (size_t i = 0; i < b; ++i) vb[i] = -static_cast<int64_t>(i + 2);
      Dims x = va;
      const Dims copy = x;
      x = vb;
      same = same && x.vec() == vb && copy.vec() == va && x.size() == b && x.empty() == (b == 0);
      x = copy;
      same = same && x == copy && x.vec() == va && (a == 0 || x.back() == va.back());
      // Filled, then written in place (as the readers build shapes), across the boundary too.
      x.fill(b, 7);
      same = same && x.vec() == std::vector<int64_t>(b, 7);
      for (size_t i = 0; i < b; ++i) x[i] = vb[i];
      same = same && x.vec() == vb;
      x.assign(va.data(), a);
      same = same && x.vec() == va;
    }
  }
  expect(same, "Dims keeps its values inline and on the heap");
}

// The copy engine reads cached ranges through a FileView (a second, shared
// mapping). A file cut under it: the guard over that view turns the SIGBUS into
// zeros and MappedFile::pages_lost(), which the engine reports.
void test_file_view_truncated_under_guard() {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));  // just written: cached
  auto file = MappedFile::open(path);
  auto view = FileView::open(*file, 0);
  if (!view) {
    expect(!FileView::supported(*file), "FileView::open fails only without cachestat");
    std::printf("SKIP FileView tests: this kernel has no cachestat(2)\n");
    ::unlink(path.c_str());
    return;
  }
  expect(view->cached(100, 2 * 4096) == view->data() + 100 && view->data()[100] == 'a',
         "a just-written range is cached and read through the view");
  truncate_file(path, 4096);
  expect(view->cached(100, 2 * 4096) == nullptr, "a range cut off the file is no longer cached");
  int seen;
  bool faulted;
  {
    FaultGuard guard(*file, view->data(), view->size());
    const volatile uint8_t* last = view->data() + view->size() - 1;
    seen = *last;  // past the new end: SIGBUS, turned into a zero page
    faulted = guard.faulted();
  }
  expect(seen == 0 && faulted && file->pages_lost(),
         "a read of the view past the new end gives zeros and pages_lost(), no SIGBUS");
  view.reset();  // unmaps the view and the zero pages over it
  ::unlink(path.c_str());
}

}  // namespace

int main() {
  test_dims_inline_and_heap();
  test_flat_string_map_matches_unordered_map();
  test_truncated_before_parse();
  test_reader_that_succeeds_on_zeros_still_fails();
  test_shrink_without_touching();
  test_truncated_by_another_thread_while_parsing();
  test_file_view_truncated_under_guard();
  test_unguarded_sigbus_still_kills();
  std::printf("%d failure(s)\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
