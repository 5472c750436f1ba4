// Turns the object tree a PickleVM built into what a reader returns: one
// TensorRecord per place a tensor sits in the tree (dotted names from container
// keys and list indices), and the plain values as a bounded JSON object.
// The walk is iterative, so deep or cyclic trees cannot exhaust the C++ stack.
#pragma once

#include <string>
#include <vector>

#include "common/flat_string_map.h"
#include "formats/checkpoint_index.h"
#include "formats/pickle_vm.h"

namespace fastckpt::pickle {

struct TreeLimits {
  size_t max_depth = 1000;                 // container nesting (Python's own recursion limit)
  size_t max_visits = size_t{1} << 26;     // values visited (shared subtrees are visited per use)
  size_t max_tensors = size_t{1} << 24;    // tensor records
  size_t max_json_bytes = size_t{8} << 20; // metadata beyond this is left out ("__truncated__")
};

struct PickleTree {
  // TensorRecord::storage indexes PickleVM::storages().
  std::vector<TensorRecord> tensors;
  std::vector<UnloadableRecord> unloadable;  // Kind::Unloadable values where tensors are listed
  std::string metadata_json;
  FlatStringMap by_name;  // name -> position in tensors (views into their names)
};

// Placeholder objects whose state looks like an nn.Module's __dict__ (a torch.save
// of a whole model) name their tensors like state_dict() does: the `_parameters`,
// `_buffers` and `_modules` levels are left out of the names. Tensors reachable only
// through a placeholder's constructor arguments are not listed.
PickleTree walk_pickle_tree(const PickleVM& vm, const Value& root, const std::string& path,
                            const TreeLimits& limits = {});

}  // namespace fastckpt::pickle
