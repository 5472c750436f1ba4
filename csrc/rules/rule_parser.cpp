#include "rules/rule_parser.h"

#include <cctype>
#include <limits>
#include <utility>

#include "common/error.h"

namespace fastckpt::rules {
namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

bool is_name(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  return true;
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// The spellings users write for a cast; the safetensors names work as well.
std::optional<DType> dtype_from_alias(std::string_view text) {
  static const std::pair<const char*, DType> kAliases[] = {
      {"bf16", DType::BF16},      {"bfloat16", DType::BF16},  {"fp16", DType::F16},
      {"f16", DType::F16},        {"float16", DType::F16},    {"half", DType::F16},
      {"fp32", DType::F32},       {"f32", DType::F32},        {"float32", DType::F32},
      {"float", DType::F32},      {"fp64", DType::F64},       {"f64", DType::F64},
      {"float64", DType::F64},    {"double", DType::F64},     {"fp8_e4m3", DType::F8_E4M3},
      {"float8_e4m3fn", DType::F8_E4M3}, {"fp8_e5m2", DType::F8_E5M2},
      {"float8_e5m2", DType::F8_E5M2},   {"fp8_e4m3fnuz", DType::F8_E4M3FNUZ},
      {"float8_e4m3fnuz", DType::F8_E4M3FNUZ}, {"fp8_e5m2fnuz", DType::F8_E5M2FNUZ},
      {"float8_e5m2fnuz", DType::F8_E5M2FNUZ}, {"fp8_e8m0", DType::F8_E8M0},
      {"float8_e8m0fnu", DType::F8_E8M0},  {"bool", DType::BOOL},  {"uint8", DType::U8},
      {"int8", DType::I8},        {"int16", DType::I16},      {"int32", DType::I32},
      {"int64", DType::I64},      {"uint16", DType::U16},     {"uint32", DType::U32},
      {"uint64", DType::U64},
  };
  const std::string l = lower(text);
  for (const auto& [name, t] : kAliases)
    if (l == name) return t;
  return dtype_from_name(text);
}

// Parses one line; positions are byte offsets into the line, reported 1-based.
class LineParser {
 public:
  LineParser(std::string_view line, const std::string& source, int line_no)
      : s_(line), source_(source), line_no_(line_no) {}

  // Returns false for a blank or comment-only line.
  bool parse(Rule& rule) {
    skip_spaces();
    if (at_end()) return false;
    rule.line = line_no_;
    rule.column = col(pos_);

    const size_t word_start = pos_;
    const std::string_view word = read_until_space();
    std::optional<RuleKind> keyword = keyword_kind(word);
    if (keyword) {
      // A key literally named like a keyword still works as a source: `freeze -> frozen`.
      skip_spaces();
      if (starts_with_arrow(pos_)) keyword.reset();
    }
    if (keyword) {
      rule.kind = *keyword;
      if (at_end()) error(pos_, "expected a pattern after '" + std::string(word) + "'");
      const size_t p = pos_;
      rule.source_text = std::string(read_until_space());
      if (rule.kind == RuleKind::Freeze || rule.kind == RuleKind::Unfreeze)
        check_glob(rule.source_text, p);  // fastckpt.freeze matches these as shell globs
      else
        rule.source = parse_segments(rule.source_text, p, nullptr);
      skip_spaces();
      if (!at_end()) {
        const size_t extra = pos_;
        error(extra, "unexpected '" + std::string(read_until_space()) + "' after the pattern");
      }
      return true;
    }

    rule.kind = RuleKind::Map;
    pos_ = word_start;
    const size_t src_start = pos_;
    while (!at_end() && !is_space(s_[pos_]) && !starts_with_arrow(pos_)) ++pos_;
    if (pos_ == src_start) error(pos_, "expected a source pattern before '->'");
    rule.source_text = std::string(s_.substr(src_start, pos_ - src_start));
    rule.source = parse_segments(rule.source_text, src_start, nullptr);
    skip_spaces();
    if (!starts_with_arrow(pos_)) {
      if (at_end()) error(pos_, "expected '->' after the source pattern");
      const size_t found = pos_;
      error(found, "expected '->' after the source pattern, found '" + std::string(read_until_space()) + "'");
    }
    pos_ += 2;

    for (;;) {
      skip_spaces();
      const size_t t_start = pos_;
      while (!at_end() && !is_space(s_[pos_]) && s_[pos_] != ',') ++pos_;
      if (pos_ == t_start)
        error(pos_, rule.targets.empty() ? "expected a target after '->'" : "expected a target after ','");
      std::string t(s_.substr(t_start, pos_ - t_start));
      rule.targets.push_back(parse_template(t, t_start, rule.source));
      rule.target_texts.push_back(std::move(t));
      skip_spaces();
      if (at_end() || s_[pos_] != ',') break;
      ++pos_;
    }

    while (!at_end()) {
      const size_t a_start = pos_;
      const std::string_view attr = read_until_space();
      if (attr.substr(0, 5) == "rows[") {
        if (rule.rows.kind != RowSpec::Kind::None) error(a_start, "rows given twice");
        rule.rows = parse_rows(attr, a_start);
      } else if (attr.substr(0, 6) == "dtype=") {
        if (rule.dtype) error(a_start, "dtype given twice");
        const std::string_view value = attr.substr(6);
        if (value.empty()) error(a_start + 6, "expected a dtype after 'dtype='");
        rule.dtype = dtype_from_alias(value);
        if (!rule.dtype)
          error(a_start + 6, "unknown dtype '" + std::string(value) + "' (use bf16, fp16, fp32, fp64, ...)");
        rule.dtype_text = std::string(value);
      } else if (attr == "wins") {
        if (rule.wins) error(a_start, "wins given twice");
        rule.wins = true;
      } else if (is_conversion(attr)) {
        check_conversion(attr, a_start, rule.source);
        rule.convert.emplace_back(attr);
        rule.convert_columns.push_back(static_cast<int>(a_start) + 1);
      } else {
        error(a_start, "unknown attribute '" + std::string(attr) +
                           "' (expected rows[...], dtype=..., wins, stack[...], cat[...], "
                           "pick[...], split[...], transpose, rope[...] or unrope[...])");
      }
      skip_spaces();
    }
    return true;
  }

  // `stack[...]` and the other conversions: the bracket's content is read by
  // fastckpt.rules; here only its form and, for `stack[name]`, the capture.
  static bool is_conversion(std::string_view attr) {
    if (attr == "transpose") return true;
    for (std::string_view head : {"stack[", "cat[", "pick[", "split[", "rope[", "unrope["})
      if (attr.substr(0, head.size()) == head) return true;
    return false;
  }

  void check_conversion(std::string_view attr, size_t at, const Pattern& source) {
    if (attr == "transpose") return;
    const size_t open = attr.find('[');
    if (attr.back() != ']' || attr.find(']') != attr.size() - 1)
      error(at, "'" + std::string(attr) + "': expected one [...] at the end");
    std::string_view inner = attr.substr(open + 1, attr.size() - open - 2);
    if (inner.empty()) error(at + open + 1, "'" + std::string(attr) + "': empty [...]");
    if (attr.substr(0, open) != "stack" && attr.substr(0, open) != "pick") return;
    const size_t comma = inner.rfind(',');
    const std::string_view index = comma == std::string_view::npos ? inner : inner.substr(comma + 1);
    bool digits = !index.empty();
    for (char c : index) digits = digits && c >= '0' && c <= '9';
    if (digits || attr.substr(0, open) == "pick") return;
    for (const auto& e : source)
      if (e.kind == PatternElem::Kind::One && e.capture == index) return;
    error(at + open + 1, "'" + std::string(attr) + "': the source pattern has no one-segment capture {" +
                             std::string(index) + "}");
  }

  // Parses a whole pattern token that starts at line offset `start`.
  // With `source` set it is a target template over that source pattern.
  Pattern parse_segments(std::string_view token, size_t start, const Pattern* source) {
    Pattern out;
    size_t seg_start = 0;
    for (;;) {
      size_t dot = token.find('.', seg_start);
      if (dot == std::string_view::npos) dot = token.size();
      out.push_back(parse_segment(token.substr(seg_start, dot - seg_start), start + seg_start,
                                  source != nullptr));
      if (dot == token.size()) break;
      seg_start = dot + 1;
    }
    if (!source) {
      for (size_t i = 0; i < out.size(); ++i) {
        if (out[i].capture.empty()) continue;
        for (size_t j = 0; j < i; ++j)
          if (out[j].capture == out[i].capture)
            error(start + offset_of_elem(token, i), "capture {" + out[i].capture + "} appears twice");
      }
    }
    return out;
  }

 private:
  static std::optional<RuleKind> keyword_kind(std::string_view w) {
    if (w == "ignore") return RuleKind::Ignore;
    if (w == "ignore-target") return RuleKind::IgnoreTarget;
    if (w == "freeze") return RuleKind::Freeze;
    if (w == "unfreeze") return RuleKind::Unfreeze;
    return std::nullopt;
  }

  // freeze/unfreeze patterns are globs (`*` crosses dots); only `{...}` is refused,
  // since a capture there would mean nothing.
  void check_glob(std::string_view token, size_t start) {
    const size_t open = token.find('{');
    if (open != std::string_view::npos) {
      if (token.find('}', open) == std::string_view::npos) error(start + open, "unclosed '{'");
      error(start + open, "a freeze pattern is a glob: captures like {name} have no meaning there");
    }
    const size_t close = token.find('}');
    if (close != std::string_view::npos) error(start + close, "unexpected '}'");
  }

  static size_t offset_of_elem(std::string_view token, size_t elem) {
    size_t off = 0;
    for (size_t k = 0; k < elem; ++k) off = token.find('.', off) + 1;
    return off;
  }

  PatternElem parse_segment(std::string_view seg, size_t at, bool in_target) {
    PatternElem e;
    if (seg.empty()) error(at, "empty segment");
    if (seg[0] == '{') {
      const size_t close = seg.find('}');
      if (close == std::string_view::npos) error(at, "unclosed '{'");
      if (close + 1 != seg.size()) error(at + close + 1, "a capture must be a whole segment");
      std::string_view name = seg.substr(1, close - 1);
      bool many = false;
      if (!name.empty() && name.back() == '*') {
        many = true;
        name.remove_suffix(1);
      }
      if (!is_name(name)) error(at + 1, "bad capture name '" + std::string(name) + "'");
      e.kind = many ? PatternElem::Kind::Many : PatternElem::Kind::One;
      e.capture = std::string(name);
      return e;
    }
    if (seg == "*" || seg == "**") {
      if (in_target)
        error(at, "wildcards are not allowed in a target; name a capture in the source, like {name*}");
      e.kind = seg.size() == 1 ? PatternElem::Kind::One : PatternElem::Kind::Many;
      return e;
    }
    for (size_t k = 0; k < seg.size(); ++k) {
      if (seg[k] == '*') error(at + k, "'*' must be a whole segment");
      if (seg[k] == '{') error(at + k, "a capture must be a whole segment");
      if (seg[k] == '}') error(at + k, "unexpected '}'");
    }
    e.text = std::string(seg);
    return e;
  }

  Template parse_template(std::string_view token, size_t start, const Pattern& source) {
    const Pattern elems = parse_segments(token, start, &source);
    Template out;
    for (size_t i = 0; i < elems.size(); ++i) {
      TemplatePart part;
      if (elems[i].kind == PatternElem::Kind::Literal) {
        part.text = elems[i].text;
      } else {
        size_t found = source.size();
        for (size_t j = 0; j < source.size(); ++j)
          if (source[j].capture == elems[i].capture) found = j;
        if (found == source.size())
          error(start + offset_of_elem(token, i),
                "unknown capture {" + elems[i].capture + "}: the source pattern does not define it");
        part.is_capture = true;
        part.elem = found;
      }
      out.push_back(std::move(part));
    }
    return out;
  }

  RowSpec parse_rows(std::string_view attr, size_t at) {
    const size_t open = at + 4;
    if (attr.back() != ']') error(open, "unclosed '['");
    const std::string_view inner = attr.substr(5, attr.size() - 6);
    RowSpec r;
    r.column = col(at);
    if (!inner.empty() && inner[0] == '@') {
      if (inner.size() == 1) error(at + 6, "expected a file name after '@'");
      r.kind = RowSpec::Kind::File;
      r.file = std::string(inner.substr(1));
      return r;
    }
    const size_t colon = inner.find(':');
    if (colon == std::string_view::npos || inner.find(':', colon + 1) != std::string_view::npos)
      error(at + 5, "rows[...] takes a range A:B or @file");
    r.kind = RowSpec::Kind::Range;
    const std::string_view a = inner.substr(0, colon);
    const std::string_view b = inner.substr(colon + 1);
    if (!a.empty()) r.start = parse_row_number(a, at + 5);
    if (!b.empty()) r.stop = parse_row_number(b, at + 5 + colon + 1);
    if (r.stop && *r.stop < r.start)
      error(at + 5, "rows[" + std::string(inner) + "]: start is after stop");
    return r;
  }

  int64_t parse_row_number(std::string_view text, size_t at) {
    int64_t v = 0;
    for (size_t k = 0; k < text.size(); ++k) {
      const char c = text[k];
      if (c < '0' || c > '9') error(at, "bad row number '" + std::string(text) + "'");
      const int64_t digit = c - '0';
      if (v > (std::numeric_limits<int64_t>::max() - digit) / 10)
        error(at, "row number '" + std::string(text) + "' is too large");
      v = v * 10 + digit;
    }
    return v;
  }

  bool at_end() const { return pos_ >= s_.size(); }
  bool starts_with_arrow(size_t p) const { return p + 1 < s_.size() && s_[p] == '-' && s_[p + 1] == '>'; }
  void skip_spaces() {
    while (!at_end() && is_space(s_[pos_])) ++pos_;
  }
  std::string_view read_until_space() {
    const size_t start = pos_;
    while (!at_end() && !is_space(s_[pos_])) ++pos_;
    return s_.substr(start, pos_ - start);
  }
  int col(size_t p) const { return static_cast<int>(p) + 1; }

  [[noreturn]] void error(size_t p, const std::string& what) const {
    throw CheckpointError(source_ + ":" + std::to_string(line_no_) + ":" + std::to_string(col(p)) +
                          ": " + what);
  }

  std::string_view s_;
  const std::string& source_;
  int line_no_;
  size_t pos_ = 0;
};

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

}  // namespace

std::string Rule::text() const {
  switch (kind) {
    case RuleKind::Ignore: return "ignore " + source_text;
    case RuleKind::IgnoreTarget: return "ignore-target " + source_text;
    case RuleKind::Freeze: return "freeze " + source_text;
    case RuleKind::Unfreeze: return "unfreeze " + source_text;
    case RuleKind::Map: break;
  }
  std::string out = source_text + " -> " + join(target_texts, ", ");
  if (rows.kind == RowSpec::Kind::Range) {
    out += " rows[";
    if (rows.start != 0) out += std::to_string(rows.start);
    out += ":";
    if (rows.stop) out += std::to_string(*rows.stop);
    out += "]";
  } else if (rows.kind == RowSpec::Kind::File) {
    out += " rows[@" + rows.file + "]";
  }
  if (dtype) out += " dtype=" + dtype_text;
  if (wins) out += " wins";
  for (const auto& c : convert) out += " " + c;
  return out;
}

bool Rule::fills_part() const {
  for (const auto& c : convert)
    if (c.rfind("stack[", 0) == 0 || c.rfind("cat[", 0) == 0) return true;
  return false;
}

std::vector<Rule> parse_rules(std::string_view text, const std::string& source_name) {
  std::vector<Rule> out;
  int line_no = 0;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string_view::npos) end = text.size();
    ++line_no;
    std::string_view line = text.substr(start, end - start);
    // A comment runs to the end of the line; `#` never occurs in a key pattern.
    const size_t hash = line.find('#');
    if (hash != std::string_view::npos) line = line.substr(0, hash);
    Rule rule;
    if (LineParser(line, source_name, line_no).parse(rule)) out.push_back(std::move(rule));
    start = end + 1;
  }
  return out;
}

Pattern parse_pattern(std::string_view pattern, const std::string& source_name) {
  for (char c : pattern)
    if (is_space(c) || c == '\n' || c == '#')
      throw CheckpointError(source_name + ": pattern '" + std::string(pattern) +
                            "' contains a space, a newline or '#'");
  if (pattern.empty()) throw CheckpointError(source_name + ": empty pattern");
  LineParser p(pattern, source_name, 1);
  return p.parse_segments(pattern, 0, nullptr);
}

}  // namespace fastckpt::rules
