#include "rules/rename_trie.h"

#include <algorithm>
#include <unordered_set>

namespace fastckpt::rules {

void split_key(std::string_view key, std::vector<std::string_view>& out) {
  out.clear();
  size_t start = 0;
  for (;;) {
    const size_t dot = key.find('.', start);
    if (dot == std::string_view::npos) {
      out.push_back(key.substr(start));
      return;
    }
    out.push_back(key.substr(start, dot - start));
    start = dot + 1;
  }
}

void render(const Template& tmpl, const std::vector<std::string_view>& segments,
            const std::vector<Span>& spans, std::string& out) {
  // Dots go between segments, so an empty `{x*}` takes its neighbouring dot with it.
  bool first = true;
  auto put = [&](std::string_view seg) {
    if (!first) out += '.';
    out += seg;
    first = false;
  };
  for (const TemplatePart& part : tmpl) {
    if (!part.is_capture) {
      put(part.text);
      continue;
    }
    const Span s = spans[part.elem];
    for (uint32_t k = s.begin; k < s.end; ++k) put(segments[k]);
  }
}

uint32_t RenameTrie::child(uint32_t node, const PatternElem& e) {
  uint32_t next = kNoRule;
  switch (e.kind) {
    case PatternElem::Kind::Literal: {
      auto it = nodes_[node].literal.find(e.text);
      if (it != nodes_[node].literal.end()) return it->second;
      next = static_cast<uint32_t>(nodes_.size());
      const std::string& owned = literals_.emplace_back(e.text);
      nodes_.emplace_back();
      nodes_[node].literal.emplace(owned, next);
      return next;
    }
    case PatternElem::Kind::One:
      if (nodes_[node].one == kNoRule) {
        next = static_cast<uint32_t>(nodes_.size());
        nodes_.emplace_back();
        nodes_[node].one = next;
      }
      return nodes_[node].one;
    case PatternElem::Kind::Many:
      if (nodes_[node].many == kNoRule) {
        next = static_cast<uint32_t>(nodes_.size());
        nodes_.emplace_back();
        nodes_[node].many = next;
      }
      return nodes_[node].many;
  }
  return next;
}

void RenameTrie::add(const Pattern& pattern, uint32_t rule) {
  uint32_t node = 0;
  nodes_[0].min_rule = std::min(nodes_[0].min_rule, rule);
  for (const PatternElem& e : pattern) {
    node = child(node, e);
    nodes_[node].min_rule = std::min(nodes_[node].min_rule, rule);
  }
  nodes_[node].rule = std::min(nodes_[node].rule, rule);
}

// Several `**` in one pattern over a long (hostile) key would make the plain
// walk exponential. After this many steps the walk restarts and remembers
// which (node, position) pairs it has been at: a second visit cannot find a
// lower rule than the first did, so it is skipped and the walk stays polynomial.
constexpr uint64_t kMemoAfterSteps = 4096;

struct RenameTrie::Walk {
  const std::vector<std::string_view>& segments;
  std::vector<Span>& best_spans;
  std::vector<Span>& spans;  // spans of the path being walked
  uint32_t best = kNoRule;
  uint64_t steps = 0;
  bool gave_up = false;                    // step limit hit without memo
  std::unordered_set<uint64_t>* seen = nullptr;  // memo, once enabled
};

void RenameTrie::walk(Walk& w, uint32_t node, uint32_t pos, size_t depth) const {
  const Node& n = nodes_[node];
  if (n.min_rule >= w.best || w.gave_up) return;
  if (w.seen) {
    if (!w.seen->insert((static_cast<uint64_t>(node) << 32) | pos).second) return;
  } else if (++w.steps > kMemoAfterSteps) {
    w.gave_up = true;
    return;
  }
  const auto nseg = static_cast<uint32_t>(w.segments.size());
  if (w.spans.size() <= depth) w.spans.resize(depth + 1);
  if (pos == nseg && n.rule < w.best) {
    w.best = n.rule;
    w.best_spans.assign(w.spans.begin(), w.spans.begin() + static_cast<std::ptrdiff_t>(depth));
  }
  if (pos < nseg) {
    if (!n.literal.empty()) {
      auto it = n.literal.find(w.segments[pos]);
      if (it != n.literal.end()) {
        w.spans[depth] = Span{pos, pos + 1};
        walk(w, it->second, pos + 1, depth + 1);
      }
    }
    if (n.one != kNoRule) {
      w.spans[depth] = Span{pos, pos + 1};
      walk(w, n.one, pos + 1, depth + 1);
    }
  }
  if (n.many != kNoRule) {
    // Longest first: the first time a rule's end is reached it has the greedy captures.
    for (uint32_t end = nseg + 1; end-- > pos;) {
      if (nodes_[n.many].min_rule >= w.best) break;
      w.spans[depth] = Span{pos, end};
      walk(w, n.many, end, depth + 1);
    }
  }
}

uint32_t RenameTrie::match(const std::vector<std::string_view>& segments,
                           std::vector<Span>& spans) const {
  // Scratch reused across calls; one per thread so matching may run in parallel.
  thread_local std::vector<Span> scratch;
  Walk w{segments, spans, scratch};
  walk(w, 0, 0, 0);
  if (!w.gave_up) return w.best;
  std::unordered_set<uint64_t> seen;
  Walk slow{segments, spans, scratch};
  slow.seen = &seen;
  walk(slow, 0, 0, 0);
  return slow.best;
}

}  // namespace fastckpt::rules
