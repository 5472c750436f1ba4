// Tests of the rename trie (rules/rename_trie.h) against a plain matcher that
// tries the rules one by one, in id order, with greedy wildcards: the same
// winning rule and the same captured spans, whatever the order of add().
#include "rules/rename_trie.h"

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "rules/rule_parser.h"
#include "tests/check.h"

using namespace fastckpt::rules;
using namespace fastckpt::testing;

namespace {

// Pattern elements [i, end) against segments [pos, end): Many takes as many
// segments as it can, leftmost first, like the regex `(.*)` would.
bool plain_match(const Pattern& p, size_t i, const std::vector<std::string_view>& seg, uint32_t pos,
                 std::vector<Span>& spans) {
  if (i == p.size()) return pos == seg.size();
  const PatternElem& e = p[i];
  const auto n = static_cast<uint32_t>(seg.size());
  if (e.kind == PatternElem::Kind::Many) {
    for (uint32_t end = n + 1; end-- > pos;) {
      spans[i] = Span{pos, end};
      if (plain_match(p, i + 1, seg, end, spans)) return true;
    }
    return false;
  }
  if (pos == n || (e.kind == PatternElem::Kind::Literal && seg[pos] != e.text)) return false;
  spans[i] = Span{pos, pos + 1};
  return plain_match(p, i + 1, seg, pos + 1, spans);
}

uint32_t plain_first(const std::vector<Pattern>& rules, const std::vector<std::string_view>& seg,
                     std::vector<Span>& spans) {
  for (uint32_t r = 0; r < rules.size(); ++r) {
    spans.assign(rules[r].size(), Span{});
    if (plain_match(rules[r], 0, seg, 0, spans)) return r;
  }
  spans.clear();
  return kNoRule;
}

bool same_spans(const std::vector<Span>& a, const std::vector<Span>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](Span x, Span y) {
           return x.begin == y.begin && x.end == y.end;
         });
}

std::string rendered(const std::string& pattern, const std::string& target, const std::string& key) {
  const Pattern p = parse_pattern(pattern, "test");
  RenameTrie trie;
  trie.add(p, 0);
  std::vector<std::string_view> seg;
  split_key(key, seg);
  std::vector<Span> spans;
  if (trie.match(seg, spans) != 0) return "<no match>";
  // The template: literal parts, or the capture whose name is written in braces.
  Template tmpl;
  const Pattern t = parse_pattern(target, "test");
  for (const PatternElem& e : t) {
    TemplatePart part;
    if (e.kind == PatternElem::Kind::Literal) {
      part.text = e.text;
    } else {
      part.is_capture = true;
      for (size_t i = 0; i < p.size(); ++i)
        if (p[i].capture == e.capture) part.elem = i;
    }
    tmpl.push_back(part);
  }
  std::string out;
  render(tmpl, seg, spans, out);
  return out;
}

}  // namespace

// Random patterns over a small alphabet (so that many overlap) and random keys:
// the trie's winner and spans equal the plain matcher's, for shuffled add orders.
FASTCKPT_TEST(test_rename_trie_matches_plain_matcher) {
  std::mt19937 rng(11);
  // Literals twice as often as wildcards: about half the keys match some rule.
  const char* atoms[] = {"a", "b", "c", "a", "b", "c", "*", "**", "{x*}", "{y}"};
  int checked = 0, matched = 0;
  bool same = true;
  for (int round = 0; round < 200 && same; ++round) {
    std::vector<Pattern> rules;
    for (int r = 0; r < 12; ++r) {
      std::string text;
      const int len = 1 + static_cast<int>(rng() % 5);
      for (int k = 0; k < len; ++k) {
        // At most one named capture of each name in one pattern.
        std::string atom = atoms[rng() % 10];
        if (atom[0] == '{' && text.find(atom) != std::string::npos) atom = "c";
        text += (k ? "." : "") + atom;
      }
      rules.push_back(parse_pattern(text, "test"));
    }
    std::vector<uint32_t> order(rules.size());
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), rng);
    RenameTrie trie;
    for (uint32_t r : order) trie.add(rules[r], r);
    for (int k = 0; k < 60; ++k) {
      std::string key;
      const int len = 1 + static_cast<int>(rng() % 6);
      for (int s = 0; s < len; ++s) key += (s ? "." : "") + std::string(1, "abcd"[rng() % 4]);
      std::vector<std::string_view> seg;
      split_key(key, seg);
      std::vector<Span> got, want;
      const uint32_t g = trie.match(seg, got);
      const uint32_t w = plain_first(rules, seg, want);
      const bool ok = g == w && (w == kNoRule || same_spans(got, want));
      if (!ok) expect(false, "key " + key + ": trie rule " + std::to_string(g) + ", plain rule " + std::to_string(w));
      same = same && ok;
      ++checked;
      matched += w != kNoRule;
    }
  }
  expect(same && matched > checked / 10 && matched < checked,
         "the trie agrees with a rule-by-rule matcher on " + std::to_string(checked) + " keys (" +
             std::to_string(matched) + " matched)");
}

FASTCKPT_TEST(test_rename_trie_lowest_rule_wins_whatever_the_order) {
  const Pattern specific = parse_pattern("model.layers.{i}.weight", "test");
  const Pattern general = parse_pattern("model.{rest*}", "test");
  std::vector<std::string_view> seg;
  split_key("model.layers.3.weight", seg);
  std::vector<Span> spans;
  RenameTrie a, b;
  a.add(specific, 0);
  a.add(general, 1);
  b.add(general, 1);
  b.add(specific, 0);
  expect(a.match(seg, spans) == 0 && b.match(seg, spans) == 0, "rule 0 wins added first or last");
  RenameTrie c;
  c.add(specific, 5);
  c.add(specific, 2);  // the same pattern twice: the lower id is kept
  expect(c.match(seg, spans) == 2, "a pattern added twice keeps its lowest rule id");
  RenameTrie empty;
  expect(empty.empty() && empty.match(seg, spans) == kNoRule && !a.empty(), "an empty trie matches nothing");
}

FASTCKPT_TEST(test_rename_trie_captures_and_render) {
  expect(rendered("model.{rest*}", "{rest*}", "model.layers.0.w") == "layers.0.w",
         "a prefix is dropped");
  expect(rendered("a.{x*}.b", "c.{x*}.d", "a.b") == "c.d", "an empty {x*} takes its dot with it");
  expect(rendered("{x*}.{y*}", "{y*}.z", "p.q.r") == "z", "{x*} is greedy: the later capture gets nothing");
  expect(rendered("layers.{i}.{rest*}", "h.{i}.{rest*}", "layers.7.attn.q") == "h.7.attn.q",
         "one-segment and many-segment captures together");
  expect(rendered("a.*.c", "x", "a.b.b.c") == "<no match>", "* takes exactly one segment");
  expect(rendered("a.**.c", "x", "a.b.b.c") == "x" && rendered("a.**.c", "x", "a.c") == "x",
         "** takes any number of segments, zero included");
  std::vector<std::string_view> seg;
  split_key("a..b", seg);
  expect(seg.size() == 3 && seg[1].empty(), "split_key keeps empty segments");
}

// Several ** over a long hostile key: the walk switches to its memo and stays
// polynomial, with the same answer as for a short key.
FASTCKPT_TEST(test_rename_trie_many_wildcards_stay_fast) {
  RenameTrie trie;
  trie.add(parse_pattern("**.**.**.**.**.**.x", "test"), 0);
  std::string key;
  for (int i = 0; i < 300; ++i) key += "s.";
  std::vector<std::string_view> seg;
  std::vector<Span> spans;
  const std::string miss_key = key + "y", hit_key = key + "x";  // seg views into them
  const auto start = std::chrono::steady_clock::now();
  split_key(miss_key, seg);
  const uint32_t miss = trie.match(seg, spans);
  split_key(hit_key, seg);
  const uint32_t hit = trie.match(seg, spans);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  expect(miss == kNoRule && hit == 0 && spans.size() == 7 && spans[0].end == 300,
         "six ** over 301 segments: no match for .y, greedy match for .x");
  expect(seconds < 20, "and in " + std::to_string(seconds) + " s (bounded, sanitizers included)");
}
