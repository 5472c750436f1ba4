// Rule patterns compiled into one trie over dot-separated key segments, so
// that matching a key against every rule is a single walk, not a loop over rules.
#pragma once

#include <cstdint>
#include <deque>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "rules/rule.h"

namespace fastckpt::rules {

inline constexpr uint32_t kNoRule = std::numeric_limits<uint32_t>::max();

// Segments [begin, end) of a key matched by one pattern element.
struct Span {
  uint32_t begin = 0;
  uint32_t end = 0;
};

// Splits "a.b.c" into views of "a", "b", "c" (into `out`, reused between calls).
void split_key(std::string_view key, std::vector<std::string_view>& out);

// Appends a target template, filled with the key segments its captures matched, to `out`.
void render(const Template& tmpl, const std::vector<std::string_view>& segments,
            const std::vector<Span>& spans, std::string& out);

class RenameTrie {
 public:
  // Adds a pattern under a rule id. The lowest id that matches a key wins,
  // whatever the order of add() calls.
  void add(const Pattern& pattern, uint32_t rule);

  // The lowest rule id whose pattern matches `segments`, or kNoRule. For that
  // rule, `spans` gets one entry per pattern element; `{x*}` and `**` take as
  // many segments as they can (leftmost first), like a greedy regex.
  uint32_t match(const std::vector<std::string_view>& segments, std::vector<Span>& spans) const;

  bool empty() const { return nodes_[0].min_rule == kNoRule; }

 private:
  struct Node {
    std::unordered_map<std::string_view, uint32_t> literal;  // views into literals_
    uint32_t one = kNoRule;       // child through a one-segment element
    uint32_t many = kNoRule;      // child through a zero-or-more element
    uint32_t rule = kNoRule;      // lowest rule whose pattern ends here
    uint32_t min_rule = kNoRule;  // lowest rule in this subtree: prunes the walk
  };

  struct Walk;
  void walk(Walk& w, uint32_t node, uint32_t pos, size_t depth) const;
  uint32_t child(uint32_t node, const PatternElem& e);

  std::vector<Node> nodes_{Node{}};
  std::deque<std::string> literals_;  // deque: stable addresses for the views
};

}  // namespace fastckpt::rules
