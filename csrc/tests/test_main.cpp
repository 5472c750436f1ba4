// fastckpt_native_tests [FILTER...]: runs every test registered by the
// csrc/**/x_test.cpp files linked in (or those whose name or file contains a
// FILTER); exit status 1 when a check failed. `make test-asan` runs it under
// ASan/UBSan, where any sanitizer report aborts it as well.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "tests/check.h"

namespace fastckpt::testing {

namespace {
int g_failures = 0;
}

std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;  // a function static: filled by other files' initialisers
  return tests;
}

void expect(bool cond, const std::string& what) {
  std::printf("%s %s\n", cond ? "PASS" : "FAIL", what.c_str());
  if (!cond) ++g_failures;
}

int failures() { return g_failures; }

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

}  // namespace fastckpt::testing

int main(int argc, char** argv) {
  using namespace fastckpt::testing;
  int ran = 0;
  for (const TestCase& t : registry()) {
    bool wanted = argc < 2;
    for (int i = 1; i < argc; ++i) wanted = wanted || contains(t.name, argv[i]) || contains(t.file, argv[i]);
    if (!wanted) continue;
    std::printf("== %s (%s)\n", t.name, t.file);
    std::fflush(stdout);  // the last line names the test when something aborts
    const int before = failures();
    try {
      t.fn();
    } catch (const std::exception& e) {
      expect(false, std::string(t.name) + " threw " + e.what());
    }
    if (failures() != before) std::printf("-- %s: %d failed check(s)\n", t.name, failures() - before);
    ++ran;
  }
  std::printf("%d test(s), %d failure(s)\n", ran, failures());
  return failures() == 0 && ran > 0 ? 0 : 1;
}
