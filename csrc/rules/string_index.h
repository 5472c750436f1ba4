// A flat open-addressing map from names to small integers, for plans over
// 100k+ keys where a node-based std::unordered_map spends its time allocating.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

namespace fastckpt::rules {

class StringIndex {
 public:
  static constexpr uint32_t kAbsent = 0xFFFFFFFFu;

  explicit StringIndex(size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2) cap <<= 1;
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
  }

  // Inserts name -> value unless present; returns the value now stored for name.
  // `name` must outlive the index.
  uint32_t insert(std::string_view name, uint32_t value) {
    Slot& s = probe(name);
    if (s.value == kAbsent) {
      s.name = name;
      s.value = value;
    }
    return s.value;
  }

  // Replaces the value of a name already present.
  void set(std::string_view name, uint32_t value) { probe(name).value = value; }

  uint32_t find(std::string_view name) const {
    return const_cast<StringIndex*>(this)->probe(name).value;
  }

 private:
  struct Slot {
    std::string_view name;
    uint32_t value = kAbsent;
  };

  Slot& probe(std::string_view name) {
    size_t i = std::hash<std::string_view>{}(name) & mask_;
    while (slots_[i].value != kAbsent && slots_[i].name != name) i = (i + 1) & mask_;
    return slots_[i];
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

}  // namespace fastckpt::rules
