// A restricted pickle machine for what torch.save writes. It NEVER imports or
// calls anything: the few torch globals it knows (_rebuild_tensor_v2, storage
// classes, OrderedDict, ...) are interpreted as data; every other global becomes
// an inert placeholder object, and calling one (REDUCE, NEWOBJ, BUILD) only
// gives another placeholder.
//
// Values live in an arena owned by the machine and refer to each other by index,
// so shared and cyclic structures cost nothing and destruction never recurses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory_resource>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/flat_string_map.h"
#include "common/dtype.h"

namespace fastckpt::pickle {

enum class Kind : uint8_t {
  None,
  Bool,
  Int,
  Float,
  BigInt,   // an integer wider than 64 bits: little-endian two's complement in Node::text
  String,
  Bytes,
  List,
  Tuple,
  Dict,     // Node::items holds key0, value0, key1, value1, ...
  Set,
  Global,   // Node::text is "module.name"
  Object,   // placeholder; Node::text the class, items [args tuple, state]
  Tensor,   // Node::aux indexes PickleVM::tensors()
  Storage,  // Node::aux indexes PickleVM::storages()
  // A tensor fastckpt cannot represent (sparse, quantized, nested, a numpy
  // array, an unknown dtype): Node::text says what it is.
  Unloadable,
};

struct Value {
  Kind kind = Kind::None;
  uint32_t node = 0;  // arena index for heap kinds
  union {
    int64_t i = 0;  // Int, Bool
    double f;       // Float
  };
};

struct Node {
  explicit Node(std::pmr::memory_resource* pool) : items(pool) {}
  Kind kind = Kind::None;
  uint32_t aux = 0;
  // Views into the pickle's own bytes (strings are not copied) or into
  // PickleVM's owned texts; both outlive the node.
  std::string_view text;
  std::pmr::vector<Value> items;  // from the machine's pool: freed all at once, not one by one
};

// A storage named by a persistent id ('storage', class, key, location, numel[, view]).
struct PickledStorage {
  std::string key;
  DType dtype;
  bool untyped = false;  // torch.UntypedStorage: bytes, the tensor carries the dtype
  // A quantized storage (QUInt8Storage, ...): torch's dtype name ("quint8");
  // dtype is then its integer representation.
  std::string_view quantized;
  // A storage class fastckpt does not know: its name; dtype is then U8 and
  // numel is not a byte count, so no tensor of it is read.
  std::string unknown_class;
  uint64_t numel = 0;    // in elements of dtype
  // Legacy storage views: (root key, offset in elements). Empty root: not a view.
  std::string view_root;
  uint64_t view_offset = 0;
};

struct PickledTensor {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  uint64_t storage_offset = 0;  // elements of dtype
  uint32_t storage = 0;         // index into PickleVM::storages()
};

struct PickleLimits {
  size_t max_memo = size_t{1} << 26;     // memo entries
  size_t max_stack = size_t{1} << 24;    // values on the stack
  size_t max_marks = size_t{1} << 20;    // open MARKs
  size_t max_nodes = size_t{1} << 27;    // arena size
  size_t max_tensors = size_t{1} << 24;  // tensors built
  size_t max_rank = 64;                  // dimensions of one tensor
};

// Which globals a pickle may name at all. With no `allows` (torch.save files)
// every global that is_code_execution_global does not refuse becomes a
// placeholder; with one (a DCP .metadata) any other global refuses the file,
// naming it and `holder` ("a DCP .metadata file").
struct GlobalPolicy {
  bool (*allows)(std::string_view qualified_name) = nullptr;
  const char* holder = "";
};

class PickleVM {
 public:
  // `path` is used in error messages only.
  explicit PickleVM(std::string path, PickleLimits limits = {}, GlobalPolicy policy = {});

  // Runs one pickle from data[0] to its STOP and returns the result; `*consumed`
  // gets the bytes used. The bytes must outlive the machine: strings view them. `what` names the pickle in errors ("data.pkl"). The
  // memo and stack start empty; storages and the arena persist across runs.
  Value run(const uint8_t* data, size_t size, size_t* consumed, const std::string& what);

  const Node& node(uint32_t i) const { return arena_[i]; }
  const Node& node(const Value& v) const { return arena_[v.node]; }
  const std::vector<PickledStorage>& storages() const { return storages_; }
  const std::vector<PickledTensor>& tensors() const { return tensors_; }
  // Index of the storage with this key, or -1.
  int64_t find_storage(std::string_view key) const;

 private:
  class Run;
  friend class Run;

  Value make(Kind kind, std::string_view text = {});
  Value make_owned(Kind kind, std::string text);
  Node& at(const Value& v) { return arena_[v.node]; }

  std::string path_;
  PickleLimits limits_;
  GlobalPolicy policy_;
  std::pmr::monotonic_buffer_resource pool_;  // declared before arena_: outlives the nodes
  std::vector<Node> arena_;
  std::vector<PickledStorage> storages_;
  FlatStringMap storage_by_key_;  // views like Node::text
  std::deque<std::string> owned_;  // texts made up by the machine; a deque never moves them
  std::vector<PickledTensor> tensors_;
};

// Torch dtype by its pickled global ("torch.float32"), or nothing.
std::optional<DType> dtype_from_torch_global(std::string_view name);

}  // namespace fastckpt::pickle
