// A parsed rules file, compiled: matches checkpoint keys and plans which
// source tensor feeds which target.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rules/rename_trie.h"
#include "rules/rule.h"

namespace fastckpt::rules {

// What the first matching rule made of each key (rule kNoRule: no rule matched).
struct SourceMatches {
  std::vector<uint32_t> rule;            // per key
  std::vector<uint32_t> target_begin;    // per key + 1: targets[target_begin[i], target_begin[i+1])
  std::vector<std::string> targets;
};

struct PlanEntry {
  std::string target;
  uint32_t source = 0;     // index into the source keys
  uint32_t rule = kNoRule;  // kNoRule: the source has the target's name
};

struct Plan {
  std::vector<PlanEntry> assignments;
  std::vector<uint32_t> ignored_sources;  // indices into the source keys
  std::vector<uint32_t> ignored_targets;  // indices into the target keys
  std::vector<uint32_t> unused_rules;     // indices into rules()
};

class RuleSet {
 public:
  RuleSet(std::vector<Rule> rules, std::string source_name);

  const std::vector<Rule>& rules() const { return rules_; }
  const std::string& source_name() const { return source_name_; }

  // First matching `SRC -> DST` or `ignore` rule for each key, with rendered targets.
  SourceMatches match_sources(const std::vector<std::string>& keys) const;
  // First matching `ignore-target` rule for each key.
  std::vector<uint32_t> match_targets(const std::vector<std::string>& keys) const;

  // Keys no rule matches map to themselves when the target has that name.
  // Targets a rule produces stay in the plan even when not among `targets`
  // (the loader reports them). Two sources for one target is an error unless
  // exactly one of them comes from a rule marked `wins`; the others are then ignored.
  Plan plan(const std::vector<std::string>& sources, const std::vector<std::string>& targets) const;

 private:
  std::vector<Rule> rules_;
  std::string source_name_;
  RenameTrie source_trie_;  // Map and Ignore rules
  RenameTrie target_trie_;  // IgnoreTarget rules
};

}  // namespace fastckpt::rules
