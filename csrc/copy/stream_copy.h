// A memcpy whose stores bypass the cache (non-temporal), for bytes that will
// not be read again soon: large loads into a model's memory. It saves the
// read-for-ownership of every destination line, which a plain copy (and the
// kernel's copy inside read()) pays: on a 2-core VM that is the gap between
// reading a file straight into a tensor and a memcpy of the same bytes.
#pragma once

#include <cstddef>

namespace fastckpt {

// Copies n bytes; the stores are visible to other threads when it returns.
void copy_streaming(void* dst, const void* src, size_t n);

}  // namespace fastckpt
