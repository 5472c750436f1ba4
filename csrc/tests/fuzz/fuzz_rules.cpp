// libFuzzer target: the rules text parser. CheckpointError is the parser's
// documented outcome for bad rules text; anything else escaping is a finding.
#include <cstdint>
#include <string_view>

#include "common/error.h"
#include "rules/rule_parser.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    fastckpt::rules::parse_rules(std::string_view(reinterpret_cast<const char*>(data), size),
                                 "fuzz.rules");
  } catch (const fastckpt::CheckpointError&) {
  }
  return 0;
}
