// The rules text format (see docs/RULES.md): one rule per line, `#` comments.
// Every error names the source, line and column: "rules.txt:3:17: unclosed '{'".
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "rules/rule.h"

namespace fastckpt::rules {

// Parses a whole rules text. `source_name` is used in error messages only.
std::vector<Rule> parse_rules(std::string_view text, const std::string& source_name);

// Parses one match pattern (wildcards and captures allowed), as on an `ignore` line.
Pattern parse_pattern(std::string_view pattern, const std::string& source_name);

}  // namespace fastckpt::rules
