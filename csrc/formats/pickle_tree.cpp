#include "formats/pickle_tree.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <unordered_set>

#include "common/error.h"
#include "common/flat_string_map.h"

namespace fastckpt::pickle {
namespace {

void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out.push_back(ch);
    }
  }
  out.push_back('"');
}

// Shortest text that reads back as the same double; always looks like a float.
std::string float_text(double f) {
  if (std::isnan(f)) return "NaN";
  if (std::isinf(f)) return f > 0 ? "Infinity" : "-Infinity";
  char buf[32];
  for (int prec = 15; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, f);
    if (std::strtod(buf, nullptr) == f) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eE") == std::string::npos) s += ".0";
  return s;
}

std::string latin1_to_utf8(std::string_view s) {
  std::string out;
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x80) {
      out.push_back(ch);
    } else {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

class TreeWalker {
 public:
  TreeWalker(const PickleVM& vm, const std::string& path, const TreeLimits& limits)
      : vm_(vm), path_(path), limits_(limits) {}

  PickleTree walk(const Value& root) {
    result_.tensors.reserve(vm_.tensors().size());
    if (root.kind == Kind::Dict) {
      enter(root, /*write=*/true, /*collect=*/true, /*module_state=*/false, /*is_root=*/true);
    } else {
      out_ += "{\"__root__\":";
      if (root.kind == Kind::Tensor || root.kind == Kind::Unloadable)
        components_.push_back("");  // a bare tensor: the name ""
      visit(root, true, true, false);
    }
    run();
    if (root.kind != Kind::Dict) out_ += truncated_ ? ",\"__truncated__\":true}" : "}";
    // Names are final now (the vector's buffer only changes hands from here on),
    // so views into them are safe; the map becomes the index's name map.
    result_.by_name.reserve(result_.tensors.size());
    for (size_t k = 0; k < result_.tensors.size(); ++k) {
      const std::string& name = result_.tensors[k].name;
      if (!result_.by_name.emplace(name, static_cast<uint32_t>(k)).second)
        fail(path_, "two tensors have the dotted name '" + name + "' (keys containing dots collide)");
    }
    for (const auto& u : result_.unloadable)
      if (result_.by_name.find(u.name) != nullptr)
        fail(path_, "two tensors have the dotted name '" + u.name + "' (keys containing dots collide)");
    result_.metadata_json = std::move(out_);
    return std::move(result_);
  }

 private:
  struct Frame {
    uint32_t node;
    Kind kind;
    size_t base;       // components_ size of this container's own path
    size_t next = 0;   // next item (dict: next pair; object: next phase)
    bool write;        // this container's JSON is being written
    bool collect;      // tensors inside are listed
    bool module_state; // dict keys _parameters/_buffers/_modules add no name component
    bool is_root;
    bool first = true;
  };

  bool budget_ok() {
    if (out_.size() < limits_.max_json_bytes) return true;
    truncated_ = true;
    return false;
  }

  void comma(Frame& f) {
    if (!f.first) out_.push_back(',');
    f.first = false;
  }

  std::string key_text(const Value& k) const {
    switch (k.kind) {
      case Kind::String: return std::string(vm_.node(k).text);
      case Kind::Int: return std::to_string(k.i);
      case Kind::Bool: return k.i ? "True" : "False";
      case Kind::None: return "None";
      case Kind::Float: return float_text(k.f);
      case Kind::Bytes: return latin1_to_utf8(vm_.node(k).text);
      case Kind::Global: return std::string(vm_.node(k).text);
      default: return std::string("<") + (k.kind == Kind::Tuple ? "tuple" : "object") + ">";
    }
  }

  std::string dotted_name() const {
    std::string name;
    for (size_t i = 0; i < components_.size(); ++i) {
      if (i) name.push_back('.');
      name += components_[i];
    }
    return name;
  }

  void record_unloadable(const Value& v) {
    if (result_.tensors.size() + result_.unloadable.size() >= limits_.max_tensors)
      throw LimitError(path_ + ": more than " + std::to_string(limits_.max_tensors) +
                       " tensor entries (the tensor limit)");
    result_.unloadable.push_back(UnloadableRecord{dotted_name(), components_, std::string(vm_.node(v).text)});
  }

  void record_tensor(const Value& v) {
    const PickledTensor& pt = vm_.tensors()[vm_.node(v).aux];
    if (result_.tensors.size() >= limits_.max_tensors)
      throw LimitError(path_ + ": more than " + std::to_string(limits_.max_tensors) +
                       " tensor entries (the tensor limit)");
    TensorRecord t;
    t.path = components_;
    for (size_t i = 0; i < components_.size(); ++i) {
      if (i) t.name.push_back('.');
      t.name += components_[i];
    }
    t.dtype = pt.dtype;
    t.shape = pt.shape;
    t.strides = pt.strides;
    t.storage_offset = pt.storage_offset;
    t.storage = pt.storage;
    result_.tensors.push_back(std::move(t));
  }

  // A value at the current path: leaves are handled here, containers get a frame.
  void visit(const Value& v, bool write, bool collect, bool module_state) {
    if (++visits_ > limits_.max_visits)
      throw LimitError(path_ + ": pickle tree has more than " + std::to_string(limits_.max_visits) +
                       " values to visit (the visit limit)");
    switch (v.kind) {
      case Kind::None: if (write) out_ += "null"; return;
      case Kind::Bool: if (write) out_ += v.i ? "true" : "false"; return;
      case Kind::Int: if (write) out_ += std::to_string(v.i); return;
      case Kind::Float: if (write) out_ += float_text(v.f); return;
      case Kind::String: if (write) append_json_string(out_, vm_.node(v).text); return;
      case Kind::BigInt:
        if (write) out_ += "{\"__bigint_bytes__\":" + std::to_string(vm_.node(v).text.size()) + "}";
        return;
      case Kind::Bytes:
        if (write) out_ += "{\"__bytes__\":" + std::to_string(vm_.node(v).text.size()) + "}";
        return;
      case Kind::Global:
        if (write) {
          out_ += "{\"__global__\":";
          append_json_string(out_, vm_.node(v).text);
          out_ += "}";
        }
        return;
      case Kind::Storage:
        if (write) {
          out_ += "{\"__storage__\":";
          append_json_string(out_, vm_.storages()[vm_.node(v).aux].key);
          out_ += "}";
        }
        return;
      case Kind::Tensor:
        if (collect) record_tensor(v);
        if (write) {
          out_ += "{\"__tensor__\":";
          if (collect) append_json_string(out_, result_.tensors.back().name);
          else out_ += "null";
          out_ += "}";
        }
        return;
      case Kind::Unloadable:
        if (collect) record_unloadable(v);
        if (write) {
          out_ += "{\"__unloadable__\":";
          append_json_string(out_, vm_.node(v).text);
          out_ += "}";
        }
        return;
      case Kind::List:
      case Kind::Tuple:
      case Kind::Set:
      case Kind::Dict:
      case Kind::Object:
        enter(v, write, collect, module_state, false);
        return;
    }
  }

  void enter(const Value& v, bool write, bool collect, bool module_state, bool is_root) {
    if (on_path_.count(v.node)) {  // a container inside itself: show it once
      if (write) out_ += "{\"__cycle__\":true}";
      return;
    }
    if (frames_.size() >= limits_.max_depth)
      throw LimitError(path_ + ": pickle containers nest deeper than " + std::to_string(limits_.max_depth) +
                       " levels (the nesting limit)");
    on_path_.insert(v.node);
    Frame f{v.node, v.kind, components_.size(), 0, write, collect, module_state, is_root};
    if (write) out_.push_back(v.kind == Kind::List || v.kind == Kind::Tuple || v.kind == Kind::Set ? '[' : '{');
    frames_.push_back(f);
  }

  void close(const Frame& f) {
    if (f.write) {
      if (f.is_root && truncated_) out_ += f.first ? "\"__truncated__\":true" : ",\"__truncated__\":true";
      out_.push_back(f.kind == Kind::List || f.kind == Kind::Tuple || f.kind == Kind::Set ? ']' : '}');
    }
    on_path_.erase(f.node);
  }

  void run() {
    while (!frames_.empty()) {
      Frame& f = frames_.back();
      const Node& n = vm_.node(f.node);
      components_.resize(f.base);
      if (f.kind == Kind::Object) {
        step_object(f, n);
        continue;
      }
      const bool dict = f.kind == Kind::Dict;
      const size_t count = dict ? n.items.size() / 2 : n.items.size();
      if (f.next >= count) {
        const Frame done = f;
        frames_.pop_back();
        close(done);
        continue;
      }
      const size_t i = f.next++;
      const bool write = f.write && budget_ok();
      if (dict) {
        const Value& key = n.items[2 * i];
        std::string k = key_text(key);
        const bool transparent = f.module_state && key.kind == Kind::String &&
                                 (k == "_parameters" || k == "_buffers" || k == "_modules");
        if (write) {
          comma(f);
          append_json_string(out_, k);
          out_.push_back(':');
        }
        if (!transparent) components_.push_back(std::move(k));
        const Value value = n.items[2 * i + 1];
        visit(value, write, f.collect, false);  // may grow frames_: f is invalid after this
      } else {
        if (write) comma(f);
        components_.push_back(std::to_string(i));
        const Value value = n.items[i];
        visit(value, write, f.collect, false);
      }
    }
  }

  // Placeholder objects: {"__object__": class, "args": [...], "state": ...}.
  void step_object(Frame& f, const Node& n) {
    const size_t phase = f.next++;
    const Value args = n.items[0];
    const Value state = n.items[1];
    if (phase == 0) {
      if (f.write) {
        out_ += "\"__object__\":";
        append_json_string(out_, n.text);
        f.first = false;
      }
    } else if (phase == 1) {
      const bool has_args = !(args.kind == Kind::Tuple && vm_.node(args).items.empty());
      const bool write = f.write && budget_ok();
      if (has_args) {
        if (write) out_ += ",\"args\":";
        visit(args, write, /*collect=*/false, false);
      }
    } else if (phase == 2) {
      const bool write = f.write && budget_ok();
      if (state.kind != Kind::None) {
        if (write) out_ += ",\"state\":";
        bool module_like = false;
        if (state.kind == Kind::Dict) {
          const auto& items = vm_.node(state).items;
          for (size_t k = 0; k + 1 < items.size(); k += 2)
            if (items[k].kind == Kind::String && vm_.node(items[k]).text == "_parameters") module_like = true;
        }
        visit(state, write, f.collect, module_like);
      }
    } else {
      const Frame done = f;
      frames_.pop_back();
      close(done);
    }
  }

  const PickleVM& vm_;
  const std::string& path_;
  const TreeLimits& limits_;
  PickleTree result_;
  std::string out_;
  bool truncated_ = false;
  size_t visits_ = 0;
  std::vector<Frame> frames_;
  std::vector<std::string> components_;
  std::unordered_set<uint32_t> on_path_;
};

}  // namespace

PickleTree walk_pickle_tree(const PickleVM& vm, const Value& root, const std::string& path,
                            const TreeLimits& limits) {
  return TreeWalker(vm, path, limits).walk(root);
}

}  // namespace fastckpt::pickle
