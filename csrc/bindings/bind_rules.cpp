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

// (kind, source, targets, rows, dtype, wins, line, column, text, convert,
// convert_columns); rows is None, ("range", start, stop_or_None) or ("file", path, column).
py::tuple rule_tuple(const rules::Rule& r) {
  py::object rows = py::none();
  if (r.rows.kind == rules::RowSpec::Kind::Range)
    rows = py::make_tuple("range", r.rows.start,
                          r.rows.stop ? py::object(py::int_(*r.rows.stop)) : py::object(py::none()));
  else if (r.rows.kind == rules::RowSpec::Kind::File)
    rows = py::make_tuple("file", r.rows.file, r.rows.column);
  py::object dtype = r.dtype ? py::object(py::str(std::string(dtype_name(*r.dtype)))) : py::object(py::none());
  return py::make_tuple(kind_name(r.kind), r.source_text, py::tuple(py::cast(r.target_texts)), rows, dtype,
                        r.wins, r.line, r.column, r.text(), py::tuple(py::cast(r.convert)),
                        py::tuple(py::cast(r.convert_columns)));
}

// A uint32 array as bytes (kNoRule stays 0xFFFFFFFF); Python reads it with memoryview.cast("I").
py::bytes u32_bytes(const std::vector<uint32_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(uint32_t));
}

// The keys as UTF-8 views, without copying: a tuple owns the str objects (and
// cannot change), and CPython keeps each str's UTF-8 form alive with the str.
struct KeyViews {
  py::tuple owner;
  std::vector<std::string_view> views;
};

KeyViews key_views(const py::handle& keys) {
  KeyViews k;
  k.owner = py::reinterpret_steal<py::tuple>(PySequence_Tuple(keys.ptr()));
  if (!k.owner) throw py::error_already_set();
  k.views.reserve(k.owner.size());
  for (const py::handle item : k.owner) {
    if (!PyUnicode_Check(item.ptr()))
      throw py::type_error("keys must be str, not " + std::string(Py_TYPE(item.ptr())->tp_name));
    Py_ssize_t len = 0;
    const char* data = PyUnicode_AsUTF8AndSize(item.ptr(), &len);
    if (!data) throw py::error_already_set();
    k.views.emplace_back(data, static_cast<size_t>(len));
  }
  return k;
}

py::list str_list(const std::vector<std::string_view>& v) {
  py::list out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = py::str(v[i].data(), v[i].size());
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
      // -> (rule per key: uint32 bytes, target_begin per key + 1: uint32 bytes, [target, ...])
      .def("match_sources",
           [](const rules::RuleSet& s, const py::object& keys) {
             const KeyViews k = key_views(keys);
             rules::SourceMatches res;
             {
               // Matching reads only the compiled trie and UTF-8 buffers the tuple keeps alive.
               py::gil_scoped_release release;
               res = s.match_sources(k.views);
             }
             std::vector<std::string_view> targets(res.target_end.size());
             for (uint32_t t = 0; t < targets.size(); ++t) targets[t] = res.target(t);
             return py::make_tuple(u32_bytes(res.rule), u32_bytes(res.target_begin), str_list(targets));
           })
      // -> rule per key: uint32 bytes
      .def("match_targets",
           [](const rules::RuleSet& s, const py::object& keys) {
             const KeyViews k = key_views(keys);
             std::vector<uint32_t> res;
             {
               // Matching reads only the compiled trie and UTF-8 buffers the tuple keeps alive.
               py::gil_scoped_release release;
               res = s.match_targets(k.views);
             }
             return u32_bytes(res);
           })
      // -> ([target, ...], source per target: uint32 bytes, rule per target: uint32 bytes,
      //     ignored_sources, ignored_targets, unused_rules: uint32 bytes)
      .def("plan",
           [](const rules::RuleSet& s, const py::object& sources, const py::object& targets) {
             const KeyViews src = key_views(sources);
             const KeyViews dst = key_views(targets);
             rules::Plan p;
             {
               // Planning touches only C++ data and UTF-8 buffers the tuples keep alive.
               py::gil_scoped_release release;
               p = s.plan(src.views, dst.views);
             }
             std::vector<std::string_view> names(p.assignments.size());
             std::vector<uint32_t> source(p.assignments.size()), rule(p.assignments.size());
             for (size_t i = 0; i < p.assignments.size(); ++i) {
               names[i] = p.target_name(p.assignments[i], src.views);
               source[i] = p.assignments[i].source;
               rule[i] = p.assignments[i].rule;
             }
             return py::make_tuple(str_list(names), u32_bytes(source), u32_bytes(rule),
                                   u32_bytes(p.ignored_sources), u32_bytes(p.ignored_targets),
                                   u32_bytes(p.unused_rules));
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
      [](const std::string& pattern, const py::object& names_obj) {
        const KeyViews k = key_views(names_obj);
        const std::vector<std::string_view>& names = k.views;
        std::vector<bool> hit(names.size());
        {
          // Pure C++ over UTF-8 buffers the tuple keeps alive.
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
