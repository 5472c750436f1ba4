// Tests of Dims (common/dims.h), the shape/strides type with inline storage.
#include "common/dims.h"

#include <cstdint>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

// Dims keeps up to 4 values in place and more on the heap; copies, assignments,
// fills and writes in place across that boundary (both ways) keep the values.
FASTCKPT_TEST(test_dims_inline_and_heap) {
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
