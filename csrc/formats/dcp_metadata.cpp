#include "formats/dcp_metadata.h"

#include <algorithm>
#include <unordered_map>

#include "common/checked_math.h"
#include "common/dtype.h"
#include "common/error.h"
#include "formats/pickle_globals.h"
#include "formats/pickle_vm.h"
#include "formats/zip_reader.h"
#include "io/fault_guard.h"
#include "io/mapped_file.h"

namespace fastckpt {
namespace {

using pickle::Kind;
using pickle::PickleVM;
using pickle::Value;

// More chunks than this in one tensor: the overlap check would be quadratic.
constexpr size_t kMaxChunksPerTensor = size_t{1} << 16;

std::string num(uint64_t v) { return std::to_string(v); }

std::string dims_text(const Dims& d) {
  std::string s = "(";
  for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
  return s + (d.size() == 1 ? ",)" : ")");
}

class Reader {
 public:
  Reader(const PickleVM& vm, const std::string& path) : vm_(vm), path_(path) {}

  DcpMetadata read(const Value& root) {
    const Value state = object_state(root, "Metadata", "the pickled value");
    if (state.kind != Kind::Dict) bad("Metadata has no field dict");
    const Value sdm = field(state, "state_dict_metadata");
    if (sdm.kind != Kind::Dict) bad("Metadata.state_dict_metadata is not a dict");
    const Value storage = field(state, "storage_data");
    if (storage.kind != Kind::Dict)
      bad("Metadata.storage_data is " + std::string(storage.kind == Kind::None ? "missing" : "not a dict") +
          " (a checkpoint not written by FileSystemWriter?)");
    const Value planner = field(state, "planner_data");
    const Value version = field(state, "version");
    if (version.kind == Kind::String) out_.version = std::string(text(version));

    read_storage(storage);
    const auto& entries = vm_.node(sdm).items;
    out_.items.reserve(entries.size() / 2);
    for (size_t k = 0; k + 1 < entries.size(); k += 2) {
      DcpItem item;
      item.fqn = key_string(entries[k], "state_dict_metadata key");
      read_item(entries[k + 1], item);
      out_.items.push_back(std::move(item));
    }
    read_paths(planner);
    return std::move(out_);
  }

 private:
  [[noreturn]] void bad(const std::string& msg) const { fail(path_, msg); }

  std::string_view text(const Value& v) const { return vm_.node(v).text; }

  std::string key_string(const Value& v, const std::string& what) const {
    if (v.kind != Kind::String) bad(what + " is not a string");
    return std::string(text(v));
  }

  // A placeholder of DCP's metadata class `cls` (module-qualified names of
  // older torch releases end the same): its BUILD state.
  Value object_state(const Value& v, std::string_view cls, const std::string& what) const {
    if (v.kind != Kind::Object) bad(what + " is not a " + std::string(cls) + " record");
    const std::string_view name = text(v);
    const size_t dot = name.rfind('.');
    if (name.substr(dot == std::string_view::npos ? 0 : dot + 1) != cls)
      bad(what + " is a " + std::string(name) + ", not a " + std::string(cls) + " record");
    return vm_.node(v).items[1];
  }
  bool is_class(const Value& v, std::string_view cls) const {
    if (v.kind != Kind::Object) return false;
    const std::string_view name = text(v);
    const size_t dot = name.rfind('.');
    return name.substr(dot == std::string_view::npos ? 0 : dot + 1) == cls;
  }

  // Field `name` of a dataclass state dict, or None.
  Value field(const Value& state, std::string_view name) const {
    if (state.kind != Kind::Dict) return Value{};
    const auto& items = vm_.node(state).items;
    for (size_t k = 0; k + 1 < items.size(); k += 2)
      if (items[k].kind == Kind::String && text(items[k]) == name) return items[k + 1];
    return Value{};
  }

  Dims int_dims(const Value& v, const std::string& what) const {
    if (v.kind != Kind::Tuple && v.kind != Kind::List) bad(what + " is not a tuple of integers");
    const auto& items = vm_.node(v).items;
    if (items.size() > 64) throw LimitError(path_ + ": " + what + " has more than 64 dimensions");
    std::vector<int64_t> out(items.size());
    for (size_t k = 0; k < items.size(); ++k) {
      if (items[k].kind != Kind::Int || items[k].i < 0) bad(what + " holds a value that is not a non-negative integer");
      out[k] = items[k].i;
    }
    return Dims(out);
  }

  uint64_t non_negative(const Value& v, const std::string& what) const {
    if (v.kind != Kind::Int || v.i < 0) bad(what + " is not a non-negative integer");
    return static_cast<uint64_t>(v.i);
  }

  // storage_data: MetadataIndex(fqn, offset, index) -> _StorageInfo(relative_path, offset, length[, transforms]).
  void read_storage(const Value& storage) {
    const auto& entries = vm_.node(storage).items;
    out_.storage.reserve(entries.size() / 2);
    for (size_t k = 0; k + 1 < entries.size(); k += 2) {
      const Value key_state = object_state(entries[k], "MetadataIndex", "a storage_data key");
      const std::string fqn = key_string(field(key_state, "fqn"), "MetadataIndex.fqn");
      const Value off = field(key_state, "offset");
      const std::string where = "storage_data entry of '" + fqn + "'";
      std::string key = fqn;
      key.push_back('\0');
      if (off.kind != Kind::None) key += dims_text(int_dims(off, where + " offset"));
      const Value info = object_state(entries[k + 1], "_StorageInfo", where);
      DcpStorage s;
      s.relative_path = key_string(field(info, "relative_path"), where + " relative_path");
      check_relative(s.relative_path, where);
      s.offset = non_negative(field(info, "offset"), where + " offset");
      s.length = non_negative(field(info, "length"), where + " length");
      if (!checked_add(s.offset, s.length)) bad(where + ": offset + length overflows 64 bits");
      const Value tr = field(info, "transform_descriptors");
      if (tr.kind == Kind::List || tr.kind == Kind::Tuple) {
        for (const Value& d : vm_.node(tr).items) s.transforms.push_back(key_string(d, where + " transform descriptor"));
      } else if (tr.kind != Kind::None) {
        bad(where + " transform_descriptors is not a list");
      }
      const auto idx = static_cast<uint32_t>(out_.storage.size());
      if (!storage_by_key_.emplace(std::move(key), idx).second) bad(where + " appears twice");
      out_.storage.push_back(std::move(s));
    }
  }

  void check_relative(const std::string& rel, const std::string& where) const {
    if (rel.empty() || rel.front() == '/' || rel.find('\0') != std::string::npos)
      bad(where + ": relative_path '" + rel + "' is not a file name inside the checkpoint directory");
    size_t start = 0;
    while (start <= rel.size()) {
      size_t end = rel.find('/', start);
      if (end == std::string::npos) end = rel.size();
      if (rel.compare(start, end - start, "..") == 0 && end - start == 2)
        bad(where + ": relative_path '" + rel + "' leaves the checkpoint directory");
      start = end + 1;
    }
  }

  uint32_t storage_of(const std::string& fqn, const Dims* offsets, const std::string& what) const {
    std::string key = fqn;
    key.push_back('\0');
    if (offsets != nullptr) key += dims_text(*offsets);
    auto it = storage_by_key_.find(key);
    if (it == storage_by_key_.end()) bad(what + " has no storage_data entry (missing chunk data)");
    return it->second;
  }

  void read_item(const Value& md, DcpItem& item) {
    const std::string where = "'" + item.fqn + "'";
    if (is_class(md, "BytesStorageMetadata")) {
      item.is_bytes = true;
      item.storage = storage_of(item.fqn, nullptr, "value " + where);
      return;
    }
    const Value st = object_state(md, "TensorStorageMetadata", "the metadata of " + where);
    read_properties(field(st, "properties"), item, where);
    item.size = int_dims(field(st, "size"), "size of " + where);
    const Value chunks = field(st, "chunks");
    if (chunks.kind != Kind::List) bad("chunks of " + where + " are not a list");
    const auto& list = vm_.node(chunks).items;
    if (list.size() > kMaxChunksPerTensor)
      throw LimitError(path_ + ": tensor " + where + " has " + num(list.size()) + " chunks, more than the limit of " +
                       num(kMaxChunksPerTensor));
    for (const Value& c : list) {
      const Value cs = object_state(c, "ChunkStorageMetadata", "a chunk of " + where);
      DcpChunk chunk;
      chunk.offsets = int_dims(field(cs, "offsets"), "chunk offsets of " + where);
      chunk.sizes = int_dims(field(cs, "sizes"), "chunk sizes of " + where);
      const std::string cw = "chunk at offsets " + dims_text(chunk.offsets) + " of " + where;
      if (chunk.offsets.size() != item.size.size() || chunk.sizes.size() != item.size.size())
        bad(cw + " has " + num(chunk.sizes.size()) + " dimensions, the tensor " + num(item.size.size()));
      for (size_t d = 0; d < item.size.size(); ++d) {
        const auto end = checked_add(static_cast<uint64_t>(chunk.offsets[d]), static_cast<uint64_t>(chunk.sizes[d]));
        if (!end || *end > static_cast<uint64_t>(item.size[d]))
          bad(cw + " (sizes " + dims_text(chunk.sizes) + ") lies outside the tensor's size " + dims_text(item.size));
      }
      chunk.storage = storage_of(item.fqn, &chunk.offsets, cw);
      item.chunks.push_back(std::move(chunk));
    }
    check_tiling(item, where);
  }

  // TensorProperties: a (dtype, layout, requires_grad, memory_format,
  // pin_memory) tuple from its __getstate__, or a field dict from older torch.
  void read_properties(const Value& props, DcpItem& item, const std::string& where) {
    const Value state = object_state(props, "TensorProperties", "the properties of " + where);
    Value dtype, layout;
    if (state.kind == Kind::Tuple) {
      const auto& t = vm_.node(state).items;
      if (t.size() < 2) bad("the properties of " + where + " are a tuple of " + num(t.size()));
      dtype = t[0];
      layout = t[1];
    } else {
      dtype = field(state, "dtype");
      layout = field(state, "layout");
    }
    if (dtype.kind != Kind::Global) bad("the dtype of " + where + " is not a torch dtype");
    item.torch_dtype = std::string(text(dtype));
    if (auto dt = pickle::dtype_from_torch_global(item.torch_dtype)) item.dtype = std::string(dtype_name(*dt));
    // _get_layout("torch.strided") as an inert call: its argument names the layout.
    if (layout.kind == Kind::Object && vm_.node(layout).items[0].kind == Kind::Tuple) {
      const auto& args = vm_.node(vm_.node(layout).items[0]).items;
      if (!args.empty() && args[0].kind == Kind::String) item.layout = std::string(text(args[0]));
    } else if (layout.kind == Kind::Global) {
      item.layout = std::string(text(layout));
    } else if (layout.kind == Kind::None) {
      item.layout = "torch.strided";  // the field's default
    }
  }

  // The chunks must cover the tensor exactly once: their volumes add up to its
  // element count and no two intersect (each lies inside it: checked above).
  void check_tiling(const DcpItem& item, const std::string& where) const {
    uint64_t numel = 1, covered = 0;
    for (size_t d = 0; d < item.size.size(); ++d) {
      auto n = checked_mul(numel, static_cast<uint64_t>(item.size[d]));
      if (!n) bad("the size of " + where + " overflows 64 bits");
      numel = *n;
    }
    for (const DcpChunk& c : item.chunks) {
      uint64_t v = 1;
      for (size_t d = 0; d < c.sizes.size(); ++d) v *= static_cast<uint64_t>(c.sizes[d]);  // <= numel: inside
      covered += v;
      if (covered > numel) break;
    }
    std::vector<size_t> order(item.chunks.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    const size_t rank = item.size.size();
    if (rank > 0) {
      std::sort(order.begin(), order.end(),
                [&](size_t a, size_t b) { return item.chunks[a].offsets[0] < item.chunks[b].offsets[0]; });
    }
    for (size_t a = 0; a < order.size(); ++a) {
      const DcpChunk& x = item.chunks[order[a]];
      for (size_t b = a + 1; b < order.size(); ++b) {
        const DcpChunk& y = item.chunks[order[b]];
        if (rank > 0 && y.offsets[0] >= x.offsets[0] + x.sizes[0]) break;  // sorted: none further meets x
        bool meet = true;
        for (size_t d = 0; d < rank && meet; ++d)
          meet = x.offsets[d] < y.offsets[d] + y.sizes[d] && y.offsets[d] < x.offsets[d] + x.sizes[d];
        bool empty = false;
        for (size_t d = 0; d < rank; ++d) empty = empty || x.sizes[d] == 0 || y.sizes[d] == 0;
        if (meet && !empty)
          bad("tensor " + where + ": chunks at offsets " + dims_text(x.offsets) + " and " + dims_text(y.offsets) +
              " overlap");
      }
    }
    if (covered != numel)
      bad("tensor " + where + ": its chunks hold " + num(covered) + " of its " + num(numel) +
          " elements (chunks missing or overlapping)");
  }

  // planner_data: flattened key -> its path in the saved state dict.
  void read_paths(const Value& planner) {
    std::unordered_map<std::string_view, size_t> by_fqn;
    for (size_t k = 0; k < out_.items.size(); ++k) by_fqn.emplace(out_.items[k].fqn, k);
    if (planner.kind == Kind::Dict) {
      const auto& entries = vm_.node(planner).items;
      for (size_t k = 0; k + 1 < entries.size(); k += 2) {
        if (entries[k].kind != Kind::String) continue;
        auto it = by_fqn.find(text(entries[k]));
        const Value p = entries[k + 1];
        if (it == by_fqn.end() || (p.kind != Kind::Tuple && p.kind != Kind::List)) continue;
        std::vector<std::string> path;
        for (const Value& part : vm_.node(p).items) {
          if (part.kind == Kind::String) {
            path.emplace_back(text(part));
          } else if (part.kind == Kind::Int) {
            path.push_back(std::to_string(part.i));
          } else {
            bad("planner_data path of '" + std::string(text(entries[k])) + "' holds a " +
                "value that is neither a string nor an integer");
          }
        }
        if (path.empty()) bad("planner_data path of '" + std::string(text(entries[k])) + "' is empty");
        out_.items[it->second].path = std::move(path);
      }
    }
    for (DcpItem& item : out_.items)
      if (item.path.empty()) item.path = {item.fqn};
  }

  const PickleVM& vm_;
  const std::string& path_;
  DcpMetadata out_;
  std::unordered_map<std::string, uint32_t> storage_by_key_;  // fqn \0 offsets text -> storage index
};

}  // namespace

DcpMetadata parse_dcp_metadata(const uint8_t* data, size_t size, const std::string& path) {
  PickleVM vm(path, {}, pickle::GlobalPolicy{&is_dcp_metadata_global, "a DCP .metadata file"});
  size_t consumed = 0;
  const Value root = vm.run(data, size, &consumed, "the metadata pickle");
  return Reader(vm, path).read(root);
}

DcpMetadata read_dcp_metadata(const std::string& path) {
  auto file = MappedFile::open(path);
  return guarded_read(file, [&](const std::shared_ptr<MappedFile>& f) {
    return parse_dcp_metadata(f->data(), f->size(), path);
  });
}

}  // namespace fastckpt

namespace fastckpt {

ArchivePickle read_archive_pickle(const MappedFile& file, uint64_t base, uint64_t length) {
  const ZipDirectory zip = ZipDirectory::read(file, base, length);
  const ZipEntry* pkl = nullptr;
  for (const auto& e : zip.entries()) {
    const std::string_view n = e.name;
    const size_t slash = n.find('/');
    if (slash == std::string_view::npos || n.substr(slash) != "/data.pkl") continue;
    if (pkl != nullptr) fail(zip.label(), "archive has more than one '<root>/data.pkl' record");
    pkl = &e;
  }
  if (pkl == nullptr) fail(zip.label(), "archive has no '<root>/data.pkl' record: not a torch.save value");
  ArchivePickle out;
  const uint64_t at = zip.data_offset(file, *pkl);
  out.bytes.resize(pkl->uncompressed_size);
  file.pread_exact(out.bytes.data(), at, out.bytes.size());  // a copy: the VM's strings view it
  out.vm = std::make_unique<pickle::PickleVM>(zip.label());
  size_t consumed = 0;
  out.root = out.vm->run(out.bytes.data(), out.bytes.size(), &consumed, "record '" + std::string(pkl->name) + "'");
  return out;
}

}  // namespace fastckpt
