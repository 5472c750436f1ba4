// A parsed rules file, compiled: matches checkpoint keys and plans which
// source tensor feeds which target.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "rules/rename_trie.h"
#include "rules/rule.h"

namespace fastckpt::rules {

// What the first matching rule made of each key (rule kNoRule: no rule matched).
// Rendered targets live in one buffer: no allocation per name.
struct SourceMatches {
  std::vector<uint32_t> rule;          // per key
  std::vector<uint32_t> target_begin;  // per key + 1: key i has targets [target_begin[i], target_begin[i+1])
  std::vector<size_t> target_end;      // per target: end offset of its name in `chars`
  std::string chars;

  std::string_view target(uint32_t k) const {
    const size_t b = k == 0 ? 0 : target_end[k - 1];
    return std::string_view(chars).substr(b, target_end[k] - b);
  }
};

struct PlanEntry {
  uint32_t target = kNoRule;  // index into Plan::matches targets; kNoRule: the source's own name
  uint32_t source = 0;        // index into the source keys
  uint32_t rule = kNoRule;    // kNoRule: the source has the target's name
};

struct Plan {
  std::vector<PlanEntry> assignments;
  std::vector<uint32_t> ignored_sources;  // indices into the source keys
  std::vector<uint32_t> ignored_targets;  // indices into the target keys
  std::vector<uint32_t> unused_rules;     // indices into rules()
  SourceMatches matches;                  // owns the rendered target names

  std::string_view target_name(const PlanEntry& e, const std::vector<std::string_view>& sources) const {
    return e.target == kNoRule ? sources[e.source] : matches.target(e.target);
  }
};

class RuleSet {
 public:
  RuleSet(std::vector<Rule> rules, std::string source_name);

  const std::vector<Rule>& rules() const { return rules_; }
  const std::string& source_name() const { return source_name_; }

  // First matching `SRC -> DST` or `ignore` rule for each key, with rendered targets.
  SourceMatches match_sources(const std::vector<std::string_view>& keys) const;
  // First matching `ignore-target` rule for each key.
  std::vector<uint32_t> match_targets(const std::vector<std::string_view>& keys) const;

  // Keys no rule matches map to themselves when the target has that name.
  // Targets a rule produces stay in the plan even when not among `targets`
  // (the loader reports them). Two sources for one target is an error unless
  // exactly one of them comes from a rule marked `wins`; the others are then ignored.
  Plan plan(const std::vector<std::string_view>& sources,
            const std::vector<std::string_view>& targets) const;

 private:
  std::vector<Rule> rules_;
  std::string source_name_;
  RenameTrie source_trie_;  // Map and Ignore rules
  RenameTrie target_trie_;  // IgnoreTarget rules
};

}  // namespace fastckpt::rules
