#include "rules/rule_set.h"

#include <algorithm>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "common/error.h"

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

SourceMatches RuleSet::match_sources(const std::vector<std::string>& keys) const {
  SourceMatches out;
  out.rule.reserve(keys.size());
  out.target_begin.reserve(keys.size() + 1);
  out.target_begin.push_back(0);
  std::vector<std::string_view> segments;
  std::vector<Span> spans;
  for (const std::string& key : keys) {
    split_key(key, segments);
    const uint32_t r = source_trie_.match(segments, spans);
    out.rule.push_back(r);
    if (r != kNoRule)
      for (const Template& t : rules_[r].targets) out.targets.push_back(render(t, segments, spans));
    out.target_begin.push_back(static_cast<uint32_t>(out.targets.size()));
  }
  return out;
}

std::vector<uint32_t> RuleSet::match_targets(const std::vector<std::string>& keys) const {
  std::vector<uint32_t> out;
  out.reserve(keys.size());
  std::vector<std::string_view> segments;
  std::vector<Span> spans;
  for (const std::string& key : keys) {
    split_key(key, segments);
    out.push_back(target_trie_.match(segments, spans));
  }
  return out;
}

namespace {

std::string describe(const std::vector<Rule>& rules, const std::string& source, uint32_t rule) {
  if (rule == kNoRule) return "'" + source + "' (same name)";
  return "'" + source + "' (line " + std::to_string(rules[rule].line) + ": " + rules[rule].text() + ")";
}

}  // namespace

Plan RuleSet::plan(const std::vector<std::string>& sources,
                   const std::vector<std::string>& targets) const {
  std::unordered_map<std::string_view, uint32_t> target_pos;
  target_pos.reserve(targets.size());
  for (size_t j = 0; j < targets.size(); ++j)
    target_pos.emplace(targets[j], static_cast<uint32_t>(j));

  const SourceMatches m = match_sources(sources);
  std::vector<bool> used(rules_.size(), false);
  Plan plan;
  std::vector<PlanEntry> cands;
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto src = static_cast<uint32_t>(i);
    const uint32_t r = m.rule[i];
    if (r == kNoRule) {
      if (target_pos.count(sources[i])) cands.push_back(PlanEntry{sources[i], src, kNoRule});
      continue;
    }
    used[r] = true;
    if (rules_[r].kind == RuleKind::Ignore) {
      plan.ignored_sources.push_back(src);
      continue;
    }
    for (uint32_t k = m.target_begin[i]; k < m.target_begin[i + 1]; ++k) {
      if (m.targets[k].empty())
        fail(source_name_, "line " + std::to_string(rules_[r].line) + ": " + rules_[r].text() +
                               ": maps '" + sources[i] + "' to an empty name");
      cands.push_back(PlanEntry{m.targets[k], src, r});
    }
  }

  // Group candidates by target; keep one source per target.
  std::unordered_map<std::string_view, std::vector<size_t>> by_target;
  by_target.reserve(cands.size());
  std::vector<size_t> order;  // first candidate index of each target, in candidate order
  for (size_t c = 0; c < cands.size(); ++c) {
    auto [it, fresh] = by_target.try_emplace(cands[c].target);
    if (fresh) order.push_back(c);
    // The same source reached twice (a duplicate target in one rule) is no conflict.
    bool dup = false;
    for (size_t prev : it->second) dup = dup || sources[cands[prev].source] == sources[cands[c].source];
    if (!dup) it->second.push_back(c);
  }
  std::vector<size_t> kept;
  std::vector<uint32_t> losers;
  kept.reserve(order.size());
  for (size_t first : order) {
    const std::vector<size_t>& group = by_target.at(cands[first].target);
    if (group.size() == 1) {
      kept.push_back(group[0]);
      continue;
    }
    std::vector<size_t> winners;
    for (size_t c : group)
      if (cands[c].rule != kNoRule && rules_[cands[c].rule].wins) winners.push_back(c);
    if (winners.size() == 1) {
      kept.push_back(winners[0]);
      for (size_t c : group)
        if (c != winners[0]) losers.push_back(cands[c].source);
      continue;
    }
    const PlanEntry& a = winners.size() > 1 ? cands[winners[0]] : cands[group[0]];
    const PlanEntry& b = winners.size() > 1 ? cands[winners[1]] : cands[group[1]];
    fail(source_name_, "target '" + a.target + "' has two sources: " +
                           describe(rules_, sources[a.source], a.rule) + " and " +
                           describe(rules_, sources[b.source], b.rule) +
                           (winners.size() > 1 ? "; both rules are marked 'wins'"
                                               : "; mark the rule whose source should win with 'wins'"));
  }

  // Targets of the model first, in the model's order; then names it lacks.
  auto pos_of = [&](size_t c) {
    auto it = target_pos.find(cands[c].target);
    return it == target_pos.end() ? targets.size() : static_cast<size_t>(it->second);
  };
  std::stable_sort(kept.begin(), kept.end(), [&](size_t x, size_t y) { return pos_of(x) < pos_of(y); });
  std::vector<bool> assigned(targets.size(), false);
  std::unordered_set<uint32_t> fed;
  plan.assignments.reserve(kept.size());
  for (size_t c : kept) {
    const size_t p = pos_of(c);
    if (p < targets.size()) assigned[p] = true;
    fed.insert(cands[c].source);
    plan.assignments.push_back(std::move(cands[c]));
  }
  for (uint32_t s : losers)
    if (!fed.count(s)) plan.ignored_sources.push_back(s);
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
