#include "formats/pickle_vm.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>

#include "common/checked_math.h"
#include "common/error.h"
#include "common/utf8.h"
#include "formats/pickle_globals.h"

namespace fastckpt::pickle {
namespace {

// Opcodes (CPython Lib/pickle.py names).
enum Op : uint8_t {
  MARK = '(',
  STOP = '.',
  POP = '0',
  POP_MARK = '1',
  DUP = '2',
  BININT = 'J',
  BININT1 = 'K',
  BININT2 = 'M',
  NONE = 'N',
  BINPERSID = 'Q',
  REDUCE = 'R',
  BINSTRING = 'T',
  SHORT_BINSTRING = 'U',
  BINUNICODE = 'X',
  APPEND = 'a',
  BUILD = 'b',
  GLOBAL = 'c',
  DICT = 'd',
  EMPTY_DICT = '}',
  APPENDS = 'e',
  BINGET = 'h',
  LONG_BINGET = 'j',
  LIST = 'l',
  EMPTY_LIST = ']',
  BINPUT = 'q',
  LONG_BINPUT = 'r',
  SETITEM = 's',
  TUPLE = 't',
  EMPTY_TUPLE = ')',
  SETITEMS = 'u',
  BINFLOAT = 'G',
  PROTO = 0x80,
  NEWOBJ = 0x81,
  TUPLE1 = 0x85,
  TUPLE2 = 0x86,
  TUPLE3 = 0x87,
  NEWTRUE = 0x88,
  NEWFALSE = 0x89,
  LONG1 = 0x8a,
  LONG4 = 0x8b,
  BINBYTES = 'B',
  SHORT_BINBYTES = 'C',
  SHORT_BINUNICODE = 0x8c,
  BINUNICODE8 = 0x8d,
  BINBYTES8 = 0x8e,
  EMPTY_SET = 0x8f,
  ADDITEMS = 0x90,
  FROZENSET = 0x91,
  NEWOBJ_EX = 0x92,
  STACK_GLOBAL = 0x93,
  MEMOIZE = 0x94,
  FRAME = 0x95,
  BYTEARRAY8 = 0x96,
};

constexpr size_t kMaxGlobalLine = 1024;
constexpr int kMaxCallDepth = 8;

struct DTypeName {
  std::string_view name;
  DType type;
};
constexpr std::array<DTypeName, 36> kTorchDTypes = {{
    {"torch.float64", DType::F64},        {"torch.double", DType::F64},
    {"torch.float32", DType::F32},        {"torch.float", DType::F32},
    {"torch.float16", DType::F16},        {"torch.half", DType::F16},
    {"torch.bfloat16", DType::BF16},      {"torch.int64", DType::I64},
    {"torch.long", DType::I64},           {"torch.int32", DType::I32},
    {"torch.int", DType::I32},            {"torch.int16", DType::I16},
    {"torch.short", DType::I16},          {"torch.int8", DType::I8},
    {"torch.uint8", DType::U8},           {"torch.bool", DType::BOOL},
    {"torch.uint16", DType::U16},         {"torch.uint32", DType::U32},
    {"torch.uint64", DType::U64},         {"torch.float8_e4m3fn", DType::F8_E4M3},
    {"torch.float8_e5m2", DType::F8_E5M2}, {"torch.complex64", DType::C64},
    {"torch.cfloat", DType::C64},         {"torch.complex128", DType::C128},
    {"torch.cdouble", DType::C128},       {"torch.complex32", DType::C32},
    {"torch.chalf", DType::C32},          {"torch.float8_e4m3fnuz", DType::F8_E4M3FNUZ},
    {"torch.float8_e5m2fnuz", DType::F8_E5M2FNUZ}, {"torch.float8_e8m0fnu", DType::F8_E8M0},
    {"torch.float4_e2m1fn_x2", DType::F4_X2}, {"torch.bits8", DType::BITS8},
    {"torch.bits16", DType::BITS16},      {"torch.bits1x8", DType::BITS1x8},
    {"torch.bits2x4", DType::BITS2x4},    {"torch.bits4x2", DType::BITS4x2},
}};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::BigInt: return "int";
    case Kind::String: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::List: return "list";
    case Kind::Tuple: return "tuple";
    case Kind::Dict: return "dict";
    case Kind::Set: return "set";
    case Kind::Global: return "global";
    case Kind::Object: return "object";
    case Kind::Tensor: return "tensor";
    case Kind::Storage: return "storage";
    case Kind::Unloadable: return "tensor";
  }
  return "?";
}

Value scalar_int(int64_t v) {
  Value r;
  r.kind = Kind::Int;
  r.i = v;
  return r;
}

}  // namespace

std::optional<DType> dtype_from_torch_global(std::string_view name) {
  for (const auto& d : kTorchDTypes)
    if (d.name == name) return d.type;
  return std::nullopt;
}

PickleVM::PickleVM(std::string path, PickleLimits limits, GlobalPolicy policy)
    : path_(std::move(path)), limits_(limits), policy_(policy) {}

int64_t PickleVM::find_storage(std::string_view key) const {
  const uint32_t* found = storage_by_key_.find(key);
  return found == nullptr ? -1 : static_cast<int64_t>(*found);
}

Value PickleVM::make_owned(Kind kind, std::string text) {
  owned_.push_back(std::move(text));
  return make(kind, owned_.back());
}

Value PickleVM::make(Kind kind, std::string_view text) {
  if (arena_.size() >= limits_.max_nodes)
    throw LimitError(path_ + ": pickle builds more than " + std::to_string(limits_.max_nodes) +
                     " objects (the object limit)");
  Value v;
  v.kind = kind;
  v.node = static_cast<uint32_t>(arena_.size());
  Node& n = arena_.emplace_back(&pool_);
  n.kind = kind;
  n.text = text;
  return v;
}

// One execution of one pickle: its stack, marks and memo.
class PickleVM::Run {
 public:
  Run(PickleVM& vm, const uint8_t* data, size_t size, const std::string& what)
      : vm_(vm), p_(data), n_(size), what_(what) {
    // torch pickles build about one object per 8 bytes: reserve once instead of regrowing.
    vm_.arena_.reserve(vm_.arena_.size() + std::min(size / 8, vm_.limits_.max_nodes));
  }

  Value exec(size_t* consumed) {
    while (true) {
      need(1);
      op_pos_ = pos_;
      const uint8_t op = p_[pos_++];
      switch (op) {
        case PROTO: {
          const uint8_t proto = read_u8();
          if (proto > 5) bad("pickle protocol " + std::to_string(proto) + " is not supported");
          break;
        }
        case FRAME: read_bytes(8); break;
        case STOP: {
          Value result = pop();
          *consumed = pos_;
          return result;
        }
        case MARK:
          if (marks_.size() >= vm_.limits_.max_marks)
            limit("more than " + std::to_string(vm_.limits_.max_marks) + " nested MARKs (the nesting limit)");
          marks_.push_back(stack_.size());
          break;
        case POP: pop(); break;
        case POP_MARK: stack_.resize(pop_mark()); break;
        case DUP: push(top()); break;
        case NONE: push(Value{}); break;
        case NEWTRUE:
        case NEWFALSE: {
          Value v;
          v.kind = Kind::Bool;
          v.i = op == NEWTRUE;
          push(v);
          break;
        }
        case BININT: {
          const uint8_t* b = read_bytes(4);
          uint32_t u = static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 8) |
                       (static_cast<uint32_t>(b[2]) << 16) | (static_cast<uint32_t>(b[3]) << 24);
          push(scalar_int(static_cast<int32_t>(u)));
          break;
        }
        case BININT1: push(scalar_int(read_u8())); break;
        case BININT2: {
          const uint8_t* b = read_bytes(2);
          push(scalar_int(b[0] | (b[1] << 8)));
          break;
        }
        case LONG1: push_long(read_u8()); break;
        case LONG4: {
          const int64_t len = read_i32();
          if (len < 0) bad("LONG4 with a negative length");
          push_long(static_cast<uint64_t>(len));
          break;
        }
        case BINFLOAT: {
          const uint8_t* b = read_bytes(8);
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | b[k];  // big-endian
          Value v;
          v.kind = Kind::Float;
          std::memcpy(&v.f, &bits, 8);
          push(v);
          break;
        }
        case SHORT_BINUNICODE: push_text(Kind::String, read_u8()); break;
        case BINUNICODE: push_text(Kind::String, read_u32()); break;
        case BINUNICODE8: push_text(Kind::String, read_u64()); break;
        case SHORT_BINSTRING: push_text(Kind::String, read_u8()); break;  // Python 2 str, read as UTF-8
        case BINSTRING: {
          const int64_t len = read_i32();
          if (len < 0) bad("BINSTRING with a negative length");
          push_text(Kind::String, static_cast<uint64_t>(len));
          break;
        }
        case SHORT_BINBYTES: push_text(Kind::Bytes, read_u8()); break;
        case BINBYTES: push_text(Kind::Bytes, read_u32()); break;
        case BINBYTES8:
        case BYTEARRAY8: push_text(Kind::Bytes, read_u64()); break;
        case EMPTY_DICT: push(vm_.make(Kind::Dict)); break;
        case EMPTY_LIST: push(vm_.make(Kind::List)); break;
        case EMPTY_TUPLE: push(vm_.make(Kind::Tuple)); break;
        case EMPTY_SET: push(vm_.make(Kind::Set)); break;
        case DICT: {
          const size_t k = pop_mark();
          if ((stack_.size() - k) % 2) bad("DICT with an odd number of items");
          push(collect(Kind::Dict, k));
          break;
        }
        case LIST: push(collect(Kind::List, pop_mark())); break;
        case TUPLE: push(collect(Kind::Tuple, pop_mark())); break;
        case FROZENSET: push(collect(Kind::Set, pop_mark())); break;
        case TUPLE1:
        case TUPLE2:
        case TUPLE3: {
          const size_t count = static_cast<size_t>(op - TUPLE1) + 1;
          if (stack_.size() < floor() + count) bad("tuple of " + std::to_string(count) + " on a short stack");
          push(collect(Kind::Tuple, stack_.size() - count));
          break;
        }
        case APPEND: {
          Value v = pop();
          add_items(top(), &v, 1, Kind::List);
          break;
        }
        case APPENDS: {
          const size_t k = pop_mark();
          add_from(k, Kind::List);
          break;
        }
        case ADDITEMS: {
          const size_t k = pop_mark();
          add_from(k, Kind::Set);
          break;
        }
        case SETITEM: {
          Value kv[2];
          kv[1] = pop();
          kv[0] = pop();
          add_items(top(), kv, 2, Kind::Dict);
          break;
        }
        case SETITEMS: {
          const size_t k = pop_mark();
          if ((stack_.size() - k) % 2) bad("SETITEMS with an odd number of items");
          add_from(k, Kind::Dict);
          break;
        }
        case BINPUT: put(read_u8()); break;
        case LONG_BINPUT: put(read_u32()); break;
        case MEMOIZE: put(memo_.size()); break;
        case BINGET: get(read_u8()); break;
        case LONG_BINGET: get(read_u32()); break;
        case GLOBAL: {
          std::string module = read_line();
          std::string name = read_line();
          push_global(module + "." + name);
          break;
        }
        case STACK_GLOBAL: {
          Value name = pop(), module = pop();
          if (name.kind != Kind::String || module.kind != Kind::String) bad("STACK_GLOBAL needs two strings");
          push_global(std::string(vm_.at(module).text) + "." + std::string(vm_.at(name).text));
          break;
        }
        case REDUCE: {
          Value args = pop(), callee = pop();
          push(call(callee, args));
          break;
        }
        case NEWOBJ: {
          Value args = pop(), cls = pop();
          push(new_object(cls, args));
          break;
        }
        case NEWOBJ_EX: {
          pop();  // kwargs
          Value args = pop(), cls = pop();
          push(new_object(cls, args));
          break;
        }
        case BUILD: {
          Value state = pop();
          const Value& obj = top();
          // Only placeholders keep their state (for metadata); BUILD on a known
          // value (an OrderedDict's _metadata, a tensor's __dict__) is dropped.
          if (obj.kind == Kind::Object) vm_.at(obj).items[1] = state;
          break;
        }
        case BINPERSID: {
          Value pid = pop();
          push(persistent_load(pid));
          break;
        }
        default: {
          char hex[8];
          std::snprintf(hex, sizeof hex, "0x%02x", op);
          bad(std::string("unsupported pickle opcode ") + hex);
        }
      }
    }
  }

 private:
  void push_global(std::string qualified) {
    if (is_code_execution_global(qualified))
      bad("refers to '" + qualified + "', which only code-executing pickles use; refusing the file (nothing was run)");
    if (vm_.policy_.allows != nullptr && !vm_.policy_.allows(qualified))
      bad("refers to '" + qualified + "', which " + vm_.policy_.holder +
          " does not hold; refusing the file (nothing was run)");
    push(vm_.make_owned(Kind::Global, std::move(qualified)));
  }

  [[noreturn]] void bad(const std::string& msg) const {
    fail(vm_.path_, what_ + " at byte " + std::to_string(op_pos_) + ": " + msg);
  }
  [[noreturn]] void limit(const std::string& msg) const {
    throw LimitError(vm_.path_ + ": " + what_ + " at byte " + std::to_string(op_pos_) + ": " + msg);
  }

  void need(uint64_t k) const {
    if (k > n_ - pos_) fail(vm_.path_, what_ + " is truncated (ends inside the pickle, at byte " + std::to_string(n_) + ")");
  }
  const uint8_t* read_bytes(uint64_t k) {
    need(k);
    const uint8_t* r = p_ + pos_;
    pos_ += k;
    return r;
  }
  uint8_t read_u8() { return *read_bytes(1); }
  uint32_t read_u32() {
    const uint8_t* b = read_bytes(4);
    return static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 8) | (static_cast<uint32_t>(b[2]) << 16) |
           (static_cast<uint32_t>(b[3]) << 24);
  }
  int64_t read_i32() { return static_cast<int32_t>(read_u32()); }
  uint64_t read_u64() {
    const uint64_t lo = read_u32();
    const uint64_t hi = read_u32();
    return lo | (hi << 32);
  }
  std::string read_line() {
    const size_t end = std::min(n_, pos_ + kMaxGlobalLine);
    for (size_t k = pos_; k < end; ++k) {
      if (p_[k] == '\n') {
        if (!valid_utf8(p_ + pos_, k - pos_)) bad("GLOBAL name is not valid UTF-8");
        std::string s(reinterpret_cast<const char*>(p_ + pos_), k - pos_);
        pos_ = k + 1;
        return s;
      }
    }
    if (end == n_) need(end - pos_ + 1);
    bad("GLOBAL name longer than " + std::to_string(kMaxGlobalLine) + " bytes");
  }

  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(const Value& v) {
    if (stack_.size() >= vm_.limits_.max_stack)
      limit("more than " + std::to_string(vm_.limits_.max_stack) + " values on the stack (the stack limit)");
    stack_.push_back(v);
  }
  Value pop() {
    if (stack_.size() <= floor()) bad("pop from an empty stack");
    Value v = stack_.back();
    stack_.pop_back();
    return v;
  }
  const Value& top() const {
    if (stack_.size() <= floor()) bad("empty stack");
    return stack_.back();
  }
  size_t pop_mark() {
    if (marks_.empty()) bad("no MARK to pop");
    const size_t k = marks_.back();
    marks_.pop_back();
    return k;
  }

  void push_text(Kind kind, uint64_t len) {
    const uint8_t* b = read_bytes(len);
    if (kind == Kind::String && !valid_utf8(b, len)) bad("string is not valid UTF-8");
    push(vm_.make(kind, std::string_view(reinterpret_cast<const char*>(b), len)));
  }
  void push_long(uint64_t len) {
    const uint8_t* b = read_bytes(len);
    if (len <= 8) {
      uint64_t u = 0;
      for (uint64_t k = len; k-- > 0;) u = (u << 8) | b[k];
      if (len > 0 && len < 8 && (b[len - 1] & 0x80)) u |= ~uint64_t{0} << (8 * len);  // sign-extend
      push(scalar_int(static_cast<int64_t>(u)));
    } else {
      push(vm_.make(Kind::BigInt, std::string_view(reinterpret_cast<const char*>(b), len)));
    }
  }

  // A container of `kind` holding stack_[from..] (which are removed).
  Value collect(Kind kind, size_t from) {
    Value v = vm_.make(kind);
    vm_.at(v).items.assign(stack_.begin() + static_cast<std::ptrdiff_t>(from), stack_.end());
    stack_.resize(from);
    return v;
  }
  void add_items(const Value& target, const Value* items, size_t count, Kind want) {
    if (target.kind == Kind::Object || target.kind == Kind::Unloadable) return;  // placeholders ignore appends/setitems
    if (target.kind != want)
      bad(std::string("cannot add items to a ") + kind_name(target.kind));
    auto& dst = vm_.at(target).items;
    dst.insert(dst.end(), items, items + count);
  }
  void add_from(size_t k, Kind want) {
    if (k == 0 || k - 1 < floor()) bad("nothing to add items to");
    const Value target = stack_[k - 1];
    add_items(target, stack_.data() + k, stack_.size() - k, want);
    stack_.resize(k);
  }

  void put(uint64_t idx) {
    if (idx >= vm_.limits_.max_memo)
      limit("memo index " + std::to_string(idx) + " exceeds the memo limit of " + std::to_string(vm_.limits_.max_memo));
    // Memo indices come in order in real pickles; a far jump would only waste memory.
    if (idx > memo_.size() + 65536) bad("memo index " + std::to_string(idx) + " jumps far past the memo");
    if (idx >= memo_.size()) {
      memo_.resize(idx + 1);
      memo_set_.resize(idx + 1, 0);
    }
    memo_[idx] = top();
    memo_set_[idx] = 1;
  }
  void get(uint64_t idx) {
    if (idx >= memo_.size() || !memo_set_[idx]) bad("memo index " + std::to_string(idx) + " was never stored");
    push(memo_[idx]);
  }

  std::string_view text_of(const Value& v) const { return vm_.arena_[v.node].text; }

  Value placeholder(std::string_view cls, const Value& args) {
    Value obj = vm_.make(Kind::Object, cls);
    vm_.at(obj).items = {args, Value{}};
    return obj;
  }

  const std::pmr::vector<Value>& tuple_items(const Value& args, std::string_view fn, size_t min_len) {
    if (args.kind != Kind::Tuple) bad(std::string(fn) + " expects a tuple of arguments");
    const auto& items = vm_.at(args).items;
    if (items.size() < min_len) bad(std::string(fn) + " expects at least " + std::to_string(min_len) + " arguments");
    return items;
  }

  Value call(const Value& callee, const Value& args) {
    // _rebuild_from_type_v2 calls back in here; real files nest it once.
    if (call_depth_ > kMaxCallDepth) limit("rebuild functions nest deeper than " + std::to_string(kMaxCallDepth));
    ++call_depth_;
    Value r = call_inner(callee, args);
    --call_depth_;
    return r;
  }

  Value call_inner(const Value& callee, const Value& args) {
    if (callee.kind == Kind::Object) return placeholder(text_of(callee), args);
    if (callee.kind != Kind::Global) bad(std::string("REDUCE on a ") + kind_name(callee.kind) + " value");
    const std::string_view name = text_of(callee);
    if (name == "torch._utils._rebuild_tensor_v2") return rebuild_tensor(args, name, 6, false);
    if (name == "torch._utils._rebuild_tensor_v3") return rebuild_tensor(args, name, 7, true);
    if (name == "torch._utils._rebuild_tensor") return rebuild_tensor(args, name, 4, false);
    if (name == "torch._utils._rebuild_parameter" || name == "torch._utils._rebuild_parameter_with_state" ||
        name == "torch._utils._rebuild_device_tensor_from_cpu_tensor") {
      const auto& items = tuple_items(args, name, 1);
      const bool tensor = items[0].kind == Kind::Tensor || items[0].kind == Kind::Unloadable;
      return tensor ? items[0] : placeholder(name, args);
    }
    if (auto what = unloadable_kind(name, args)) return unloadable(std::move(*what));
    if (name == "torch._tensor._rebuild_from_type_v2") {
      // (func, new_type, args, state): the tensor is func(*args); the subclass and its state are dropped.
      const auto items = tuple_items(args, name, 3);
      return call(items[0], items[2]);
    }
    if (name == "collections.OrderedDict") {
      Value d = vm_.make(Kind::Dict);
      if (args.kind == Kind::Tuple && !vm_.at(args).items.empty()) {
        const Value pairs = vm_.at(args).items[0];
        if (pairs.kind != Kind::List && pairs.kind != Kind::Tuple) return placeholder(name, args);
        const auto pair_list = vm_.at(pairs).items;
        for (const auto& pr : pair_list) {
          if (pr.kind != Kind::Tuple && pr.kind != Kind::List) bad("OrderedDict item is not a pair");
          const auto kv = vm_.at(pr).items;
          if (kv.size() != 2) bad("OrderedDict item is not a pair");
          vm_.at(d).items.insert(vm_.at(d).items.end(), kv.begin(), kv.end());
        }
      }
      return d;
    }
    if (name == "torch.Size") {
      const auto& items = tuple_items(args, name, 1);
      if (items[0].kind != Kind::Tuple) bad("torch.Size expects a tuple");
      return items[0];
    }
    if (name == "torch.device") {
      const auto items = tuple_items(args, name, 1);
      if (items[0].kind != Kind::String) bad("torch.device expects a string");
      std::string dev(text_of(items[0]));
      if (items.size() > 1 && items[1].kind == Kind::Int) dev += ":" + std::to_string(items[1].i);
      return vm_.make_owned(Kind::String, std::move(dev));
    }
    if (name == "builtins.set" || name == "builtins.frozenset" || name == "__builtin__.set") {
      Value s = vm_.make(Kind::Set);
      if (args.kind == Kind::Tuple && !vm_.at(args).items.empty()) {
        const Value src = vm_.at(args).items[0];
        if (src.kind == Kind::List || src.kind == Kind::Tuple || src.kind == Kind::Set) {
          auto elems = vm_.at(src).items;
          vm_.at(s).items = std::move(elems);
        }
      }
      return s;
    }
    if (name == "_codecs.encode") {
      // Protocol 2 writes bytes as _codecs.encode(str, 'latin1'): decode the code points back.
      const auto items = tuple_items(args, name, 1);
      if (items[0].kind != Kind::String) return placeholder(name, args);
      const std::string_view s = text_of(items[0]);
      std::string out;
      out.reserve(s.size());
      for (size_t k = 0; k < s.size();) {
        const auto c = static_cast<uint8_t>(s[k]);
        if (c < 0x80) {
          out.push_back(static_cast<char>(c));
          ++k;
        } else if ((c & 0xE0) == 0xC0 && k + 1 < s.size()) {
          const uint32_t cp = ((c & 0x1Fu) << 6) | (static_cast<uint8_t>(s[k + 1]) & 0x3Fu);
          if (cp > 0xFF) return placeholder(name, args);
          out.push_back(static_cast<char>(cp));
          k += 2;
        } else {
          return placeholder(name, args);
        }
      }
      return vm_.make_owned(Kind::Bytes, std::move(out));
    }
    return placeholder(name, args);
  }

  Value unloadable(std::string what) { return vm_.make_owned(Kind::Unloadable, std::move(what)); }

  // What a call to one of torch's rebuild functions for tensors fastckpt cannot
  // represent makes ("a sparse COO tensor"), or nothing for other callees.
  std::optional<std::string> unloadable_kind(std::string_view name, const Value& args) {
    static const std::pair<std::string_view, std::string_view> kFixed[] = {
        {"torch._utils._rebuild_nested_tensor", "a nested tensor"},
        {"torch._utils._rebuild_wrapper_subclass", "a tensor subclass saved without its data"},
        {"torch._utils._rebuild_meta_tensor_no_storage", "a meta tensor (no data)"},
        {"torch._utils._rebuild_device_tensor_from_numpy", "a device tensor saved as a numpy array"},
        {"torch._utils._rebuild_xla_tensor", "an XLA tensor"},
        {"numpy.core.multiarray._reconstruct", "a numpy array"},
        {"numpy._core.multiarray._reconstruct", "a numpy array"},
    };
    for (const auto& [fn, what] : kFixed)
      if (name == fn) return std::string(what);
    const std::pmr::vector<Value>* items =
        args.kind == Kind::Tuple ? &vm_.at(args).items : nullptr;
    if (name == "torch._utils._rebuild_sparse_tensor") {
      // (layout, data); the layout is torch.serialization._get_layout("torch.sparse_coo")
      // or, from older torch, the global itself.
      std::string_view layout;
      if (items != nullptr && !items->empty()) {
        const Value l = (*items)[0];
        if (l.kind == Kind::Global) layout = text_of(l);
        if (l.kind == Kind::Object && vm_.at(l).items[0].kind == Kind::Tuple) {
          const auto& largs = vm_.at(vm_.at(l).items[0]).items;
          if (!largs.empty() && largs[0].kind == Kind::String) layout = text_of(largs[0]);
        }
      }
      static const std::pair<std::string_view, std::string_view> kLayouts[] = {
          {"torch.sparse_coo", "COO"}, {"torch.sparse_csr", "CSR"}, {"torch.sparse_csc", "CSC"},
          {"torch.sparse_bsr", "BSR"}, {"torch.sparse_bsc", "BSC"},
      };
      for (const auto& [l, short_name] : kLayouts)
        if (layout == l) return "a sparse " + std::string(short_name) + " tensor";
      return std::string("a sparse tensor");
    }
    if (name == "torch._utils._rebuild_qtensor") {
      // (storage, offset, size, stride, (qscheme, ...), requires_grad, hooks)
      std::string what = "a quantized tensor";
      if (items != nullptr && !items->empty() && (*items)[0].kind == Kind::Storage) {
        const PickledStorage& st = vm_.storages_[vm_.at((*items)[0]).aux];
        if (!st.quantized.empty()) what = "a " + std::string(st.quantized) + " quantized tensor";
      }
      if (items != nullptr && items->size() > 4 && (*items)[4].kind == Kind::Tuple) {
        const auto& q = vm_.at((*items)[4]).items;
        if (!q.empty() && q[0].kind == Kind::Global) {
          std::string_view scheme = text_of(q[0]);
          if (scheme.substr(0, 6) == "torch.") scheme.remove_prefix(6);
          what += " (" + std::string(scheme) + ")";
        }
      }
      return what;
    }
    return std::nullopt;
  }

  Value new_object(const Value& cls, const Value& args) {
    if (cls.kind != Kind::Global && cls.kind != Kind::Object)
      bad(std::string("NEWOBJ on a ") + kind_name(cls.kind) + " value");
    if (cls.kind == Kind::Global && text_of(cls) == "collections.OrderedDict") return vm_.make(Kind::Dict);
    return placeholder(text_of(cls), args);
  }

  uint64_t non_negative(const Value& v, const std::string& what) {
    if (v.kind != Kind::Int || v.i < 0) bad(what + " must be a non-negative integer");
    return static_cast<uint64_t>(v.i);
  }

  std::string_view key_text(const Value& v, const std::string& what) {
    if (v.kind == Kind::String) return text_of(v);
    if (v.kind == Kind::Int) return vm_.owned_.emplace_back(std::to_string(v.i));
    bad(what + " must be a string");
  }

  // A storage's class, named by a Global: the fields of PickledStorage it sets.
  // An unknown class is recorded, not refused: tensors of it become Unloadable
  // and the rest of the file stays readable.
  void storage_class(const Value& cls, PickledStorage& s) {
    if (cls.kind != Kind::Global) bad("storage persistent id has no storage class");
    const std::string_view full = text_of(cls);
    const size_t dot = full.rfind('.');
    const std::string_view module = dot == std::string_view::npos ? std::string_view() : full.substr(0, dot);
    const std::string_view name = dot == std::string_view::npos ? full : full.substr(dot + 1);
    s.dtype = DType::U8;
    if (name == "UntypedStorage" && (module == "torch" || module == "torch.storage")) {
      s.untyped = true;
      return;
    }
    const bool torch_module = module == "torch" || module == "torch.cuda";
    auto dt = torch_module ? dtype_from_storage_class(name) : std::nullopt;
    if (!dt) {
      s.unknown_class = std::string(full);
      return;
    }
    s.dtype = *dt;
    if (auto q = quantized_storage_class(name)) s.quantized = *q;
  }

  Value persistent_load(const Value& pid) {
    if (pid.kind != Kind::Tuple) bad("persistent id is not a tuple");
    // Copies of the few Values: make() below may move the arena.
    const std::pmr::vector<Value>& ref = vm_.at(pid).items;
    const size_t count = ref.size();
    Value items[6];
    for (size_t k = 0; k < count && k < 6; ++k) items[k] = ref[k];
    if (count == 0 || items[0].kind != Kind::String) bad("persistent id has no type name");
    const std::string_view type = text_of(items[0]);
    if (type == "module" && count >= 2) return items[1];  // legacy nn.Module class + source
    if (type != "storage") bad("unknown persistent id type '" + std::string(type) + "'");
    if (count != 5 && count != 6) bad("storage persistent id has " + std::to_string(count) + " fields");
    PickledStorage s;
    storage_class(items[1], s);
    const std::string_view key = key_text(items[2], "storage key");
    if (items[4].kind != Kind::Int || items[4].i < 0) bad("storage '" + std::string(key) + "' size must be a non-negative integer");
    const auto numel = static_cast<uint64_t>(items[4].i);
    // items[3] is the location ('cpu', 'cuda:0'): ignored, data is read where the caller wants it.
    const bool is_view = count == 6 && items[5].kind != Kind::None;
    if (!is_view) {
      if (const uint32_t* found = vm_.storage_by_key_.find(key)) return storage_value(*found);
    }
    s.key = std::string(key);
    s.numel = numel;
    if (is_view) {
      if (items[5].kind != Kind::Tuple || vm_.at(items[5]).items.size() != 3) bad("storage view metadata is malformed");
      const auto view = vm_.at(items[5]).items;
      PickledStorage v = s;
      v.view_root = s.key;
      v.key = std::string(key_text(view[0], "storage view key"));
      v.view_offset = non_negative(view[1], "storage view offset");
      v.numel = non_negative(view[2], "storage view size");
      register_storage(std::move(s));
      return storage_value(register_storage(std::move(v)));
    }
    return storage_value(register_storage(std::move(s)));
  }

  uint32_t register_storage(PickledStorage s) {
    if (const uint32_t* found = vm_.storage_by_key_.find(s.key)) return *found;
    const auto idx = static_cast<uint32_t>(vm_.storages_.size());
    // The map needs a key that stays put while storages_ grows.
    vm_.storage_by_key_.emplace(std::string_view(vm_.owned_.emplace_back(s.key)), idx);
    vm_.storages_.push_back(std::move(s));
    return idx;
  }
  Value storage_value(uint32_t idx) {
    Value v = vm_.make(Kind::Storage);
    vm_.at(v).aux = idx;
    return v;
  }

  // Messages name the rebuild function and the argument; they are built only on failure.
  std::vector<int64_t> int_tuple(const Value& v, std::string_view fn, const char* what) {
    if (v.kind != Kind::Tuple && v.kind != Kind::List) bad(std::string(fn) + ": " + what + " is not a tuple");
    const auto& items = vm_.at(v).items;
    if (items.size() > vm_.limits_.max_rank)
      limit(std::string(fn) + ": " + what + " has " + std::to_string(items.size()) +
            " dimensions, more than the limit of " + std::to_string(vm_.limits_.max_rank));
    std::vector<int64_t> out(items.size());
    for (size_t k = 0; k < items.size(); ++k) {
      if (items[k].kind != Kind::Int || items[k].i < 0)
        bad(std::string(fn) + ": " + what + " holds a value that is not a non-negative integer");
      out[k] = items[k].i;
    }
    return out;
  }

  Value rebuild_tensor(const Value& args, std::string_view fn_name, size_t min_args, bool v3) {
    const std::string_view fn = fn_name.substr(fn_name.rfind('.') + 1);
    const auto& ref = tuple_items(args, fn, min_args);
    Value items[7];
    for (size_t k = 0; k < min_args; ++k) items[k] = ref[k];
    if (items[0].kind != Kind::Storage) bad(std::string(fn) + ": argument 0 is not a storage");
    PickledTensor t;
    t.storage = vm_.at(items[0]).aux;
    if (items[1].kind != Kind::Int || items[1].i < 0)
      bad(std::string(fn) + ": storage offset must be a non-negative integer");
    t.storage_offset = static_cast<uint64_t>(items[1].i);
    t.shape = int_tuple(items[2], fn, "size");
    t.strides = int_tuple(items[3], fn, "stride");
    if (t.shape.size() != t.strides.size()) bad(std::string(fn) + ": size and stride differ in length");
    const PickledStorage& storage = vm_.storages_[t.storage];
    if (v3) {
      if (items[6].kind != Kind::Global) bad(std::string(fn) + ": argument 6 is not a dtype");
      auto dt = dtype_from_torch_global(text_of(items[6]));
      if (!dt) return unloadable("a tensor of dtype " + std::string(text_of(items[6])) + ", which fastckpt does not know");
      t.dtype = *dt;
    } else {
      t.dtype = storage.dtype;
    }
    if (!storage.unknown_class.empty())
      return unloadable("a tensor of storage class " + storage.unknown_class + ", which fastckpt does not know");
    if (!storage.quantized.empty())
      return unloadable("a " + std::string(storage.quantized) + " tensor outside torch's quantized rebuild");
    if (vm_.tensors_.size() >= vm_.limits_.max_tensors)
      limit("more than " + std::to_string(vm_.limits_.max_tensors) + " tensors (the tensor limit)");
    Value v = vm_.make(Kind::Tensor);
    vm_.at(v).aux = static_cast<uint32_t>(vm_.tensors_.size());
    vm_.tensors_.push_back(std::move(t));
    return v;
  }

  PickleVM& vm_;
  const uint8_t* p_;
  size_t n_;
  const std::string& what_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  int call_depth_ = 0;
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  std::vector<Value> memo_;
  std::vector<uint8_t> memo_set_;
};

Value PickleVM::run(const uint8_t* data, size_t size, size_t* consumed, const std::string& what) {
  Run r(*this, data, size, what);
  return r.exec(consumed);
}

}  // namespace fastckpt::pickle
