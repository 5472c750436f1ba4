// One parsed line of a rules file: what it matches, what it produces and how.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace fastckpt::rules {

// One element of a pattern over dot-separated key segments.
struct PatternElem {
  enum class Kind : uint8_t {
    Literal,  // the segment text itself
    One,      // exactly one segment: `{name}` or `*`
    Many,     // zero or more segments: `{name*}` or `**`
  };
  Kind kind = Kind::Literal;
  std::string text;     // Literal: the segment
  std::string capture;  // One/Many: the capture name; empty for `*` / `**`
};

using Pattern = std::vector<PatternElem>;

// One element of a target template: a literal segment or a capture's segments.
struct TemplatePart {
  bool is_capture = false;
  std::string text;   // literal segment
  size_t elem = 0;    // capture: index of the source PatternElem it copies
};

using Template = std::vector<TemplatePart>;

enum class RuleKind : uint8_t { Map, Ignore, IgnoreTarget, Freeze, Unfreeze };

// `rows[A:B]` (either bound optional) or `rows[@file]`.
struct RowSpec {
  enum class Kind : uint8_t { None, Range, File };
  Kind kind = Kind::None;
  int64_t start = 0;
  std::optional<int64_t> stop;
  std::string file;  // as written, relative to the rules file
  int column = 0;    // of `rows[`, for errors found when the file is read
};

struct Rule {
  RuleKind kind = RuleKind::Map;
  std::string source_text;  // the pattern as written
  Pattern source;
  std::vector<std::string> target_texts;  // Map only
  std::vector<Template> targets;          // Map only
  RowSpec rows;
  std::optional<DType> dtype;
  std::string dtype_text;  // as written, for round trips
  bool wins = false;       // this rule's source wins over any other source for its targets
  // Conversions, as written (`stack[e]`, `cat[:,0:8]`, `split[0:8]`, `pick[2]`,
  // `transpose`, `rope[32]`, `unrope[32]`), in order; their meaning is read by
  // fastckpt.rules. convert_columns: where each starts, for errors.
  std::vector<std::string> convert;
  std::vector<int> convert_columns;
  int line = 0;            // 1-based position of the rule in its file
  int column = 0;

  // The rule in canonical text form: parse(text()) gives the same rule back.
  std::string text() const;

  // Whether its source fills a region of the target (`stack[...]` / `cat[...]`):
  // then several sources of such rules feed one target together.
  bool fills_part() const;
};

}  // namespace fastckpt::rules
