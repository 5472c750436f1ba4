#include "formats/checkpoint_index.h"

#include "common/checked_math.h"
#include "common/error.h"

namespace fastckpt {

uint64_t checked_numel(const std::string& path, const TensorRecord& t) {
  uint64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) fail(path, "tensor '" + t.name + "' has a negative dimension");
    auto r = checked_mul(n, static_cast<uint64_t>(d));
    if (!r) fail(path, "tensor '" + t.name + "': element count overflows 64 bits");
    n = *r;
  }
  return n;
}

void index_names(CheckpointIndex& index) {
  if (index.by_name.size() == index.tensors.size()) return;  // the reader built it (torch files)
  index.by_name.clear();
  index.by_name.reserve(index.tensors.size());
  for (size_t k = 0; k < index.tensors.size(); ++k)
    index.by_name.emplace(index.tensors[k].name, static_cast<uint32_t>(k));
}

bool is_contiguous(const TensorRecord& t) {
  // As in torch, an empty tensor is contiguous; this also keeps `expected`
  // bounded by the element count (its other dimensions may be huge).
  for (int64_t d : t.shape)
    if (d == 0) return true;
  int64_t expected = 1;
  for (size_t i = t.shape.size(); i-- > 0;) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

void validate_index(const CheckpointIndex& index) {
  const std::string& path = index.path();
  const uint64_t file_size = index.file->size();
  for (const auto& s : index.storages) {
    if (!range_fits(s.file_offset, s.nbytes, file_size)) {
      fail(path, "storage '" + s.key + "' (bytes " + std::to_string(s.file_offset) + " +" +
                     std::to_string(s.nbytes) + ") lies outside the file (" +
                     std::to_string(file_size) + " bytes)");
    }
  }
  for (const auto& t : index.tensors) {
    if (t.storage >= index.storages.size())
      fail(path, "tensor '" + t.name + "' refers to a storage that does not exist");
    if (t.strides.size() != t.shape.size())
      fail(path, "tensor '" + t.name + "': shape and strides differ in length");
    const auto& s = index.storages[t.storage];
    const uint64_t numel = checked_numel(path, t);
    const uint64_t item = dtype_itemsize(t.dtype);
    if (numel == 0) continue;  // an empty tensor reads nothing
    // Highest element index reachable: offset + sum((dim - 1) * stride).
    uint64_t last = t.storage_offset;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.strides[i] < 0) fail(path, "tensor '" + t.name + "' has a negative stride");
      auto step = checked_mul(static_cast<uint64_t>(t.shape[i] - 1), static_cast<uint64_t>(t.strides[i]));
      auto sum = step ? checked_add(last, *step) : std::nullopt;
      if (!sum) fail(path, "tensor '" + t.name + "': extent overflows 64 bits");
      last = *sum;
    }
    auto end_elems = checked_add(last, 1);
    auto end_bytes = end_elems ? checked_mul(*end_elems, item) : std::nullopt;
    if (!end_bytes || *end_bytes > s.nbytes) {
      fail(path, "tensor '" + t.name + "' reaches past the end of its storage '" + s.key + "' (" +
                     std::to_string(s.nbytes) + " bytes)");
    }
  }
}

}  // namespace fastckpt
