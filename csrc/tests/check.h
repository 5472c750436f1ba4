// The native tests' small harness: each component's x_test.cpp (beside x.cpp)
// registers its tests with FASTCKPT_TEST; test_main.cpp runs them all, or
// those whose name or file contains an argument, and counts failed checks.
// No test framework dependency: the sanitizer build must need nothing beyond
// the compiler.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.h"

namespace fastckpt::testing {

using TestFn = void (*)();

struct TestCase {
  const char* name;
  const char* file;
  TestFn fn;
};

std::vector<TestCase>& registry();

struct Register {
  Register(const char* name, const char* file, TestFn fn) { registry().push_back({name, file, fn}); }
};

// Prints PASS/FAIL and the description; a failure is counted, the test goes on.
void expect(bool cond, const std::string& what);
int failures();

// The text of the CheckpointError f() throws, or "" when it returns.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const CheckpointError& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A new file under /tmp holding `content`; the caller unlinks it.
std::string temp_file(const std::string& content);

}  // namespace fastckpt::testing

#define FASTCKPT_TEST(name)                                                                   \
  static void name();                                                                         \
  static const ::fastckpt::testing::Register name##_registered(#name, __FILE__, &name);      \
  static void name()
