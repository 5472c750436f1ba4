#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "rules/rule_parser.h"
#include "rules/rule_set.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

using rules::kNoRule;

const char* kind_name(rules::RuleKind k) {
  switch (k) {
    case rules::RuleKind::Map: return "map";
    case rules::RuleKind::Ignore: return "ignore";
    case rules::RuleKind::IgnoreTarget: return "ignore-target";
    case rules::RuleKind::Freeze: return "freeze";
    case rules::RuleKind::Unfreeze: return "unfreeze";
  }
  return "?";
}

py::object rule_index(uint32_t r) { return r == kNoRule ? py::object(py::none()) : py::int_(r); }

// (kind, source, targets, rows, dtype, wins, line, column, text); rows is None,
// ("range", start, stop_or_None) or ("file", path, column).
py::tuple rule_tuple(const rules::Rule& r) {
  py::object rows = py::none();
  if (r.rows.kind == rules::RowSpec::Kind::Range)
    rows = py::make_tuple("range", r.rows.start,
                          r.rows.stop ? py::object(py::int_(*r.rows.stop)) : py::object(py::none()));
  else if (r.rows.kind == rules::RowSpec::Kind::File)
    rows = py::make_tuple("file", r.rows.file, r.rows.column);
  py::object dtype = r.dtype ? py::object(py::str(std::string(dtype_name(*r.dtype)))) : py::object(py::none());
  return py::make_tuple(kind_name(r.kind), r.source_text, py::tuple(py::cast(r.target_texts)), rows, dtype,
                        r.wins, r.line, r.column, r.text());
}

py::list index_list(const std::vector<uint32_t>& v) {
  py::list out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = py::int_(v[i]);
  return out;
}

}  // namespace

void register_rules(py::module_& m) {
  py::class_<rules::RuleSet, std::shared_ptr<rules::RuleSet>>(m, "RuleSet")
      .def_property_readonly("source_name", &rules::RuleSet::source_name)
      .def("__len__", [](const rules::RuleSet& s) { return s.rules().size(); })
      .def("rules",
           [](const rules::RuleSet& s) {
             py::list out;
             for (const auto& r : s.rules()) out.append(rule_tuple(r));
             return out;
           })
      // -> [(rule index or None, (targets...)) per key]
      .def("match_sources",
           [](const rules::RuleSet& s, const std::vector<std::string>& keys) {
             rules::SourceMatches res;
             {
               // Matching reads only the compiled trie and the converted keys.
               py::gil_scoped_release release;
               res = s.match_sources(keys);
             }
             py::list out(keys.size());
             for (size_t i = 0; i < keys.size(); ++i) {
               py::tuple t(res.target_begin[i + 1] - res.target_begin[i]);
               for (uint32_t k = res.target_begin[i]; k < res.target_begin[i + 1]; ++k)
                 t[k - res.target_begin[i]] = py::str(res.targets[k]);
               out[i] = py::make_tuple(rule_index(res.rule[i]), t);
             }
             return out;
           })
      .def("match_targets",
           [](const rules::RuleSet& s, const std::vector<std::string>& keys) {
             std::vector<uint32_t> res;
             {
               // Matching reads only the compiled trie and the converted keys.
               py::gil_scoped_release release;
               res = s.match_targets(keys);
             }
             py::list out(res.size());
             for (size_t i = 0; i < res.size(); ++i) out[i] = rule_index(res[i]);
             return out;
           })
      // -> ([(target, source index, rule index or None)], ignored_sources,
      //     ignored_targets, unused_rules), all indices.
      .def("plan",
           [](const rules::RuleSet& s, const std::vector<std::string>& sources,
              const std::vector<std::string>& targets) {
             rules::Plan p;
             {
               // Planning touches only C++ data: the trie and the converted key lists.
               py::gil_scoped_release release;
               p = s.plan(sources, targets);
             }
             py::list assignments(p.assignments.size());
             for (size_t i = 0; i < p.assignments.size(); ++i) {
               const auto& a = p.assignments[i];
               assignments[i] = py::make_tuple(a.target, a.source, rule_index(a.rule));
             }
             return py::make_tuple(assignments, index_list(p.ignored_sources),
                                   index_list(p.ignored_targets), index_list(p.unused_rules));
           });

  m.def(
      "parse_rules",
      [](const std::string& text, const std::string& source_name) {
        // Parsing and compiling the trie are pure C++ on a copied string.
        py::gil_scoped_release release;
        return std::make_shared<rules::RuleSet>(rules::parse_rules(text, source_name), source_name);
      },
      py::arg("text"), py::arg("source_name"), "Parse and compile a rules text.");

  m.def(
      "match_pattern",
      [](const std::string& pattern, const std::vector<std::string>& names) {
        std::vector<bool> hit(names.size());
        {
          // Pure C++ over converted strings.
          py::gil_scoped_release release;
          rules::RenameTrie trie;
          trie.add(rules::parse_pattern(pattern, "pattern"), 0);
          std::vector<std::string_view> segments;
          std::vector<rules::Span> spans;
          for (size_t i = 0; i < names.size(); ++i) {
            rules::split_key(names[i], segments);
            hit[i] = trie.match(segments, spans) != kNoRule;
          }
        }
        return hit;
      },
      py::arg("pattern"), py::arg("names"), "For each name: does the pattern match it.");
}

}  // namespace fastckpt::bindings
