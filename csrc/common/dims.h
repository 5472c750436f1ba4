// A tensor's shape or strides: up to kInline values stored in place, more on
// the heap. Index records, destination targets and copy tasks each hold two or
// four of these per tensor; as std::vectors they were an allocation (and a free)
// apiece, most of the planning time for 30k small tensors.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastckpt {

class Dims {
 public:
  static constexpr size_t kInline = 4;

  Dims() = default;
  Dims(const std::vector<int64_t>& v) { assign(v.data(), v.size()); }  // NOLINT: implicit on purpose
  Dims(const Dims& o) { assign(o.data(), o.size()); }
  Dims& operator=(const Dims& o) {
    if (this != &o) assign(o.data(), o.size());
    return *this;
  }
  Dims& operator=(const std::vector<int64_t>& v) {
    assign(v.data(), v.size());
    return *this;
  }

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  const int64_t* data() const { return n_ <= kInline ? inline_ : heap_.data(); }
  const int64_t* begin() const { return data(); }
  const int64_t* end() const { return data() + n_; }
  int64_t operator[](size_t i) const { return data()[i]; }
  int64_t& operator[](size_t i) { return (n_ <= kInline ? inline_ : heap_.data())[i]; }
  int64_t back() const { return data()[n_ - 1]; }
  std::vector<int64_t> vec() const { return {begin(), end()}; }

  void assign(const int64_t* p, size_t n) {
    if (n <= kInline) {
      std::copy(p, p + n, inline_);
      heap_.clear();
    } else {
      heap_.assign(p, p + n);
    }
    n_ = n;
  }
  // n copies of value.
  void fill(size_t n, int64_t value) {
    if (n <= kInline) {
      std::fill(inline_, inline_ + n, value);
      heap_.clear();
    } else {
      heap_.assign(n, value);
    }
    n_ = n;
  }

  friend bool operator==(const Dims& a, const Dims& b) {
    return a.n_ == b.n_ && std::equal(a.begin(), a.end(), b.begin());
  }

 private:
  int64_t inline_[kInline] = {};
  std::vector<int64_t> heap_;  // used only when n_ > kInline
  size_t n_ = 0;
};

}  // namespace fastckpt
