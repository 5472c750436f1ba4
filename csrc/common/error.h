// The one exception type of the core. Bindings translate it to
// fastckpt.CheckpointError; messages always carry the file and what is wrong.
#pragma once

#include <stdexcept>
#include <string>

namespace fastckpt {

class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A hostile-input limit (header size, nesting depth, ...) was hit.
class LimitError : public CheckpointError {
 public:
  using CheckpointError::CheckpointError;
};

[[noreturn]] inline void fail(const std::string& path, const std::string& what) {
  throw CheckpointError(path + ": " + what);
}

}  // namespace fastckpt
