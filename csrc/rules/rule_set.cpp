#include "rules/rule_set.h"

#include <algorithm>
#include <utility>

#include "common/error.h"
#include "rules/string_index.h"

namespace fastckpt::rules {

RuleSet::RuleSet(std::vector<Rule> rules, std::string source_name)
    : rules_(std::move(rules)), source_name_(std::move(source_name)) {
  for (size_t i = 0; i < rules_.size(); ++i) {
    const auto id = static_cast<uint32_t>(i);
    switch (rules_[i].kind) {
      case RuleKind::Map:
      case RuleKind::Ignore: source_trie_.add(rules_[i].source, id); break;
      case RuleKind::IgnoreTarget: target_trie_.add(rules_[i].source, id); break;
      case RuleKind::Freeze:
      case RuleKind::Unfreeze: break;
    }
  }
}

SourceMatches RuleSet::match_sources(const std::vector<std::string_view>& keys) const {
  SourceMatches out;
  out.rule.reserve(keys.size());
  out.target_begin.reserve(keys.size() + 1);
  out.target_begin.push_back(0);
  std::vector<std::string_view> segments;
  std::vector<Span> spans;
  for (const std::string_view key : keys) {
    split_key(key, segments);
    const uint32_t r = source_trie_.match(segments, spans);
    out.rule.push_back(r);
    if (r != kNoRule) {
      for (const Template& t : rules_[r].targets) {
        render(t, segments, spans, out.chars);
        out.target_end.push_back(out.chars.size());
      }
    }
    out.target_begin.push_back(static_cast<uint32_t>(out.target_end.size()));
  }
  return out;
}

std::vector<uint32_t> RuleSet::match_targets(const std::vector<std::string_view>& keys) const {
  std::vector<uint32_t> out(keys.size(), kNoRule);
  if (target_trie_.empty()) return out;
  std::vector<std::string_view> segments;
  std::vector<Span> spans;
  for (size_t i = 0; i < keys.size(); ++i) {
    split_key(keys[i], segments);
    out[i] = target_trie_.match(segments, spans);
  }
  return out;
}

namespace {

std::string describe(const std::vector<Rule>& rules, std::string_view source, uint32_t rule) {
  if (rule == kNoRule) return "'" + std::string(source) + "' (same name)";
  return "'" + std::string(source) + "' (line " + std::to_string(rules[rule].line) + ": " +
         rules[rule].text() + ")";
}

struct Candidate {
  std::string_view target;  // into the SourceMatches buffer or a source key
  uint32_t target_index;    // PlanEntry::target
  uint32_t source;
  uint32_t rule;
  uint32_t next = kNoRule;  // next candidate for the same target
};

}  // namespace

Plan RuleSet::plan(const std::vector<std::string_view>& sources,
                   const std::vector<std::string_view>& targets) const {
  const auto no_pos = static_cast<uint32_t>(targets.size());
  StringIndex target_pos(targets.size());
  for (size_t j = 0; j < targets.size(); ++j) target_pos.insert(targets[j], static_cast<uint32_t>(j));

  Plan plan;
  plan.matches = match_sources(sources);
  const SourceMatches& m = plan.matches;
  std::vector<bool> used(rules_.size(), false);
  std::vector<Candidate> cands;
  cands.reserve(sources.size());
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto src = static_cast<uint32_t>(i);
    const uint32_t r = m.rule[i];
    if (r == kNoRule) {
      if (target_pos.find(sources[i]) != StringIndex::kAbsent)
        cands.push_back(Candidate{sources[i], kNoRule, src, kNoRule});
      continue;
    }
    used[r] = true;
    if (rules_[r].kind == RuleKind::Ignore) {
      plan.ignored_sources.push_back(src);
      continue;
    }
    for (uint32_t k = m.target_begin[i]; k < m.target_begin[i + 1]; ++k) {
      if (m.target(k).empty())
        fail(source_name_, "line " + std::to_string(rules_[r].line) + ": " + rules_[r].text() +
                               ": maps '" + std::string(sources[i]) + "' to an empty name");
      cands.push_back(Candidate{m.target(k), k, src, r});
    }
  }

  // Chain the candidates of each target; `heads` keeps first-seen order.
  StringIndex last(cands.size());
  std::vector<uint32_t> heads;
  heads.reserve(cands.size());
  for (size_t c = 0; c < cands.size(); ++c) {
    const auto ci = static_cast<uint32_t>(c);
    const uint32_t prev = last.insert(cands[c].target, ci);
    if (prev == ci) {
      heads.push_back(ci);
    } else {
      cands[prev].next = ci;
      last.set(cands[c].target, ci);
    }
  }

  std::vector<std::pair<uint32_t, uint32_t>> kept;  // (target position, candidate)
  kept.reserve(heads.size());
  std::vector<uint32_t> losers;
  std::vector<uint32_t> group;
  for (uint32_t head : heads) {
    uint32_t pick = head;
    if (cands[head].next != kNoRule) {
      // Distinct sources only: a rule naming one target twice is no conflict.
      group.clear();
      for (uint32_t c = head; c != kNoRule; c = cands[c].next) {
        bool dup = false;
        for (uint32_t g : group) dup = dup || sources[cands[g].source] == sources[cands[c].source];
        if (!dup) group.push_back(c);
      }
      bool parts = group.size() > 1;
      for (uint32_t c : group)
        parts = parts && cands[c].rule != kNoRule && rules_[cands[c].rule].fills_part();
      if (parts) {
        // Stacked or concatenated sources feed the target together.
        const uint32_t pos = target_pos.find(cands[head].target);
        for (uint32_t c : group) kept.emplace_back(pos == StringIndex::kAbsent ? no_pos : pos, c);
        continue;
      }
      if (group.size() > 1) {
        std::vector<uint32_t> winners;
        for (uint32_t c : group)
          if (cands[c].rule != kNoRule && rules_[cands[c].rule].wins) winners.push_back(c);
        if (winners.size() != 1) {
          const Candidate& a = cands[winners.size() > 1 ? winners[0] : group[0]];
          const Candidate& b = cands[winners.size() > 1 ? winners[1] : group[1]];
          fail(source_name_, "target '" + std::string(a.target) + "' has two sources: " +
                                 describe(rules_, sources[a.source], a.rule) + " and " +
                                 describe(rules_, sources[b.source], b.rule) +
                                 (winners.size() > 1 ? "; both rules are marked 'wins'"
                                                     : "; mark the rule whose source should win with 'wins'"));
        }
        pick = winners[0];
        for (uint32_t c : group)
          if (c != pick) losers.push_back(cands[c].source);
      }
    }
    const uint32_t pos = target_pos.find(cands[pick].target);
    kept.emplace_back(pos == StringIndex::kAbsent ? no_pos : pos, pick);
  }

  // Targets of the model first, in the model's order; then names it lacks, in source order.
  std::stable_sort(kept.begin(), kept.end(),
                   [](const auto& x, const auto& y) { return x.first < y.first; });
  std::vector<bool> assigned(targets.size(), false);
  std::vector<bool> fed(sources.size(), false);
  plan.assignments.reserve(kept.size());
  for (const auto& [pos, c] : kept) {
    if (pos != no_pos) assigned[pos] = true;
    fed[cands[c].source] = true;
    plan.assignments.push_back(PlanEntry{cands[c].target_index, cands[c].source, cands[c].rule});
  }
  for (uint32_t s : losers)
    if (!fed[s]) plan.ignored_sources.push_back(s);
  std::sort(plan.ignored_sources.begin(), plan.ignored_sources.end());
  plan.ignored_sources.erase(std::unique(plan.ignored_sources.begin(), plan.ignored_sources.end()),
                             plan.ignored_sources.end());

  const std::vector<uint32_t> tm = match_targets(targets);
  for (size_t j = 0; j < targets.size(); ++j) {
    if (tm[j] == kNoRule) continue;
    used[tm[j]] = true;
    if (!assigned[j]) plan.ignored_targets.push_back(static_cast<uint32_t>(j));
  }

  for (size_t r = 0; r < rules_.size(); ++r)
    if (!used[r] && rules_[r].kind != RuleKind::Freeze && rules_[r].kind != RuleKind::Unfreeze)
      plan.unused_rules.push_back(static_cast<uint32_t>(r));
  return plan;
}

}  // namespace fastckpt::rules
