// string_view -> uint32_t hash map in one flat array (open addressing, linear
// probing). Readers index 30k names per checkpoint: std::unordered_map's one
// allocation and one pointer chase per entry were a sixth of a torch file's
// open. Keys are views: what they point into must outlive the map.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <utility>
#include <vector>

namespace fastckpt {

class FlatStringMap {
 public:
  FlatStringMap() = default;
  explicit FlatStringMap(size_t expected) { reserve(expected); }

  void reserve(size_t expected) {
    size_t cap = 16;
    while (cap < expected * 2) cap *= 2;  // load factor at most 1/2 once `expected` are in
    if (cap > slots_.size()) rehash(cap);
  }

  size_t size() const { return size_; }

  void clear() {
    std::vector<Slot>().swap(slots_);
    size_ = 0;
  }

  // The value stored under `key`, or nullptr.
  const uint32_t* find(std::string_view key) const {
    if (slots_.empty()) return nullptr;
    const size_t h = hash(key);
    for (size_t i = h & mask(); slots_[i].used; i = (i + 1) & mask())
      if (slots_[i].hash == h && slots_[i].key == key) return &slots_[i].value;
    return nullptr;
  }

  // Inserts (key, value) unless key is present; returns the stored value and
  // whether it was inserted (like std::unordered_map::emplace).
  std::pair<uint32_t, bool> emplace(std::string_view key, uint32_t value) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.empty() ? 16 : slots_.size() * 2);
    const size_t h = hash(key);
    size_t i = h & mask();
    for (; slots_[i].used; i = (i + 1) & mask())
      if (slots_[i].hash == h && slots_[i].key == key) return {slots_[i].value, false};
    slots_[i] = Slot{key, h, value, true};
    ++size_;
    return {value, true};
  }

 private:
  struct Slot {
    std::string_view key;
    size_t hash = 0;
    uint32_t value = 0;
    bool used = false;
  };

  static size_t hash(std::string_view key) { return std::hash<std::string_view>{}(key); }
  size_t mask() const { return slots_.size() - 1; }

  void rehash(size_t cap) {
    std::vector<Slot> old(cap);
    old.swap(slots_);
    for (const Slot& s : old) {
      if (!s.used) continue;
      size_t i = s.hash & mask();
      while (slots_[i].used) i = (i + 1) & mask();
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

}  // namespace fastckpt
