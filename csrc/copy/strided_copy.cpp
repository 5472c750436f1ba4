#include "copy/strided_copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace fastckpt {
namespace {

// Visits the view's elements [first, first + n) as runs along the last
// dimension: visit(element_offset, run_length, dense_position).
template <typename Visit>
void walk(const StridedView& v, uint64_t first, uint64_t n, Visit&& visit) {
  const auto& shape = *v.shape;
  const auto& strides = *v.strides;
  if (shape.empty()) {
    if (n) visit(int64_t{0}, uint64_t{1}, uint64_t{0});
    return;
  }
  const size_t rank = shape.size();
  std::vector<int64_t> idx(rank, 0);
  uint64_t rest = first;
  for (size_t i = rank; i-- > 0;) {
    const auto dim = static_cast<uint64_t>(shape[i]);
    idx[i] = static_cast<int64_t>(rest % dim);
    rest /= dim;
  }
  uint64_t done = 0;
  while (done < n) {
    int64_t offset = 0;
    for (size_t i = 0; i < rank; ++i) offset += idx[i] * strides[i];
    const uint64_t run =
        std::min<uint64_t>(n - done, static_cast<uint64_t>(shape[rank - 1] - idx[rank - 1]));
    visit(offset, run, done);
    done += run;
    idx[rank - 1] += static_cast<int64_t>(run);
    for (size_t i = rank - 1; i > 0 && idx[i] == shape[i]; --i) {
      idx[i] = 0;
      ++idx[i - 1];
    }
  }
}

}  // namespace

void gather(const StridedView& v, uint64_t first, uint64_t n, uint8_t* dense) {
  const int64_t step = v.shape->empty() ? 1 : v.strides->back();
  const size_t item = v.itemsize;
  walk(v, first, n, [&](int64_t offset, uint64_t run, uint64_t pos) {
    const uint8_t* src = v.base + offset * static_cast<int64_t>(item);
    uint8_t* dst = dense + pos * item;
    if (step == 1) {
      std::memcpy(dst, src, run * item);
      return;
    }
    for (uint64_t k = 0; k < run; ++k)
      std::memcpy(dst + k * item, src + static_cast<int64_t>(k) * step * static_cast<int64_t>(item), item);
  });
}

void scatter(const uint8_t* dense, uint64_t first, uint64_t n, const StridedView& v) {
  const int64_t step = v.shape->empty() ? 1 : v.strides->back();
  const size_t item = v.itemsize;
  walk(v, first, n, [&](int64_t offset, uint64_t run, uint64_t pos) {
    uint8_t* dst = v.base + offset * static_cast<int64_t>(item);
    const uint8_t* src = dense + pos * item;
    if (step == 1) {
      std::memcpy(dst, src, run * item);
      return;
    }
    for (uint64_t k = 0; k < run; ++k)
      std::memcpy(dst + static_cast<int64_t>(k) * step * static_cast<int64_t>(item), src + k * item, item);
  });
}

}  // namespace fastckpt
