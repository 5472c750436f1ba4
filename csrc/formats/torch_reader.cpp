#include "formats/torch_reader.h"

#include <cstring>

#include "common/checked_math.h"
#include "common/error.h"
#include "formats/pickle_tree.h"
#include "formats/pickle_vm.h"
#include "formats/zip_reader.h"

namespace fastckpt {
namespace {

using pickle::PickledStorage;
using pickle::PickleVM;

std::string num(uint64_t v) { return std::to_string(v); }

// Bytes a pickled storage declares: numel elements of its dtype.
uint64_t declared_nbytes(const std::string& path, const PickledStorage& s) {
  auto n = checked_mul(s.numel, dtype_itemsize(s.dtype));
  if (!n) fail(path, "storage '" + s.key + "': byte size overflows 64 bits");
  return *n;
}

// The archive's root folder: torch names it after the file it first saved to,
// so it is found from the `<root>/data.pkl` record rather than assumed.
std::string find_root(const std::string& path, const ZipDirectory& zip) {
  std::string found;
  size_t count = 0;
  for (const auto& e : zip.entries()) {
    const std::string_view n = e.name;
    const size_t slash = n.find('/');
    if (slash == std::string_view::npos || n.substr(slash) != "/data.pkl") continue;
    if (count++ == 0) found = std::string(n.substr(0, slash));
  }
  if (count == 0) fail(path, "zip archive has no '<root>/data.pkl' record: not a torch.save file");
  if (count > 1) fail(path, "zip archive has " + num(count) + " '<root>/data.pkl' records; expected one");
  return found;
}

// Legacy storage views point into their root storage: resolve them to absolute ranges.
void resolve_views(const std::string& path, const PickleVM& vm, std::vector<StorageRecord>& out) {
  const auto& ps = vm.storages();
  for (size_t i = 0; i < ps.size(); ++i) {
    if (ps[i].view_root.empty()) continue;
    const int64_t root = vm.find_storage(ps[i].view_root);
    if (root < 0 || !ps[static_cast<size_t>(root)].view_root.empty())
      fail(path, "storage view '" + ps[i].key + "' has no root storage");
    const StorageRecord& r = out[static_cast<size_t>(root)];
    const uint64_t item = dtype_itemsize(ps[i].dtype);
    auto off = checked_mul(ps[i].view_offset, item);
    const uint64_t len = declared_nbytes(path, ps[i]);
    if (!off || !range_fits(*off, len, r.nbytes))
      fail(path, "storage view '" + ps[i].key + "' lies outside its root storage '" + r.key + "'");
    out[i].file_offset = r.file_offset + *off;
    out[i].nbytes = len;
  }
}

CheckpointIndex finish(std::shared_ptr<MappedFile> file, const char* format, const PickleVM& vm,
                       const pickle::Value& root, std::vector<StorageRecord> storages) {
  CheckpointIndex index;
  index.file = std::move(file);
  index.format = format;
  pickle::PickleTree tree = pickle::walk_pickle_tree(vm, root, index.path());
  index.storages = std::move(storages);
  index.tensors = std::move(tree.tensors);  // the records stay put: by_name's views hold
  index.by_name = std::move(tree.by_name);
  index.unloadable = std::move(tree.unloadable);
  index.metadata_json = std::move(tree.metadata_json);
  validate_index(index);
  return index;
}

}  // namespace

CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file) {
  const uint64_t size = file->size();
  return read_torch_zip(std::move(file), 0, size);
}

CheckpointIndex read_torch_zip(std::shared_ptr<MappedFile> file, uint64_t base, uint64_t length) {
  const ZipDirectory zip = ZipDirectory::read(*file, base, length);
  const std::string& path = zip.label();
  const std::string root_dir = find_root(path, zip);
  const std::string prefix = root_dir + "/";

  if (const ZipEntry* bo = zip.find(prefix + "byteorder")) {
    const auto* p = reinterpret_cast<const char*>(zip.data(*file, *bo));
    const std::string order(p, bo->uncompressed_size > 16 ? 16 : bo->uncompressed_size);
    if (order == "big") fail(path, "checkpoint was saved on a big-endian machine; only little-endian data is supported");
    if (order != "little") fail(path, "record '" + prefix + "byteorder' holds neither 'little' nor 'big'");
  }

  const ZipEntry* pkl = zip.find(prefix + "data.pkl");
  const uint8_t* pkl_data = zip.data(*file, *pkl);
  PickleVM vm(path);
  size_t consumed = 0;
  const pickle::Value root = vm.run(pkl_data, pkl->uncompressed_size, &consumed, "record '" + std::string(pkl->name) + "'");

  std::vector<StorageRecord> storages;
  storages.reserve(vm.storages().size());
  std::string record = prefix + "data/";
  const size_t record_base = record.size();
  for (const PickledStorage& s : vm.storages()) {
    StorageRecord out{s.key, 0, 0, s.dtype};
    if (!s.view_root.empty()) {  // resolved below, once every root is known
      storages.push_back(std::move(out));
      continue;
    }
    record.resize(record_base);
    record += s.key;
    const ZipEntry* e = zip.find(record);
    if (!e) fail(path, "record '" + record + "' (storage '" + s.key + "') is missing from the archive");
    out.file_offset = zip.data_offset(*file, *e);
    // A class fastckpt does not know has no known item size: its tensors are
    // listed as unloadable and never read, so the record's size stands in.
    out.nbytes = s.unknown_class.empty() ? declared_nbytes(path, s) : e->uncompressed_size;
    if (out.nbytes > e->uncompressed_size)
      fail(path, "record '" + record + "' holds " + num(e->uncompressed_size) + " bytes but its storage declares " +
                     num(out.nbytes));
    storages.push_back(std::move(out));
  }
  resolve_views(path, vm, storages);
  return finish(std::move(file), "torch_zip", vm, root, std::move(storages));
}

CheckpointIndex read_torch_legacy(std::shared_ptr<MappedFile> file) {
  const std::string& path = file->path();
  const uint8_t* base = file->data();
  const uint64_t size = file->size();
  uint64_t pos = 0;
  PickleVM vm(path);
  auto next = [&](const std::string& what) {
    size_t used = 0;
    pickle::Value v = vm.run(base + pos, size - pos, &used, what);
    pos += used;
    return v;
  };

  // The magic number 0x1950a86a20f9469cfc6c, pickled as a 10-byte LONG1.
  static const uint8_t kMagic[10] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
  const pickle::Value magic = next("legacy magic number pickle");
  if (magic.kind != pickle::Kind::BigInt || vm.node(magic).text.size() != 10 ||
      std::memcmp(vm.node(magic).text.data(), kMagic, 10) != 0)
    fail(path, "legacy torch file has a wrong magic number");
  const pickle::Value protocol = next("legacy protocol version pickle");
  if (protocol.kind != pickle::Kind::Int || protocol.i != 1001)
    fail(path, "legacy torch file has an unknown protocol version");
  const pickle::Value sys_info = next("legacy sys_info pickle");
  if (sys_info.kind == pickle::Kind::Dict) {
    const auto& items = vm.node(sys_info).items;
    for (size_t k = 0; k + 1 < items.size(); k += 2) {
      if (items[k].kind == pickle::Kind::String && vm.node(items[k]).text == "little_endian" &&
          items[k + 1].kind == pickle::Kind::Bool && !items[k + 1].i)
        fail(path, "checkpoint was saved on a big-endian machine; only little-endian data is supported");
    }
  }
  const pickle::Value root = next("legacy main pickle");
  const pickle::Value keys = next("legacy storage key pickle");
  if (keys.kind != pickle::Kind::List && keys.kind != pickle::Kind::Tuple)
    fail(path, "legacy storage key pickle is not a list");

  std::vector<StorageRecord> storages;
  storages.reserve(vm.storages().size());
  for (const PickledStorage& s : vm.storages()) storages.push_back({s.key, 0, 0, s.dtype});
  std::vector<uint8_t> seen(storages.size(), 0);
  // After the pickles: per key, an 8-byte little-endian element count, then the bytes.
  for (const pickle::Value& k : vm.node(keys).items) {
    if (k.kind != pickle::Kind::String) fail(path, "legacy storage key list holds a non-string");
    const std::string key(vm.node(k).text);
    const int64_t idx = vm.find_storage(key);
    if (idx < 0 || !vm.storages()[static_cast<size_t>(idx)].view_root.empty())
      fail(path, "legacy storage '" + key + "' is listed but no tensor refers to it");
    const auto i = static_cast<size_t>(idx);
    if (seen[i]++) fail(path, "legacy storage '" + key + "' is listed twice");
    const PickledStorage& s = vm.storages()[i];
    if (!s.unknown_class.empty())
      fail(path, "legacy storage '" + key + "' has the storage class " + s.unknown_class +
                     ", which fastckpt does not know: its size, and where the data after it starts, are unknown");
    const uint8_t* count_bytes = file->span(pos, 8, "legacy storage '" + key + "' size");
    uint64_t count = 0;
    for (int b = 7; b >= 0; --b) count = (count << 8) | count_bytes[b];
    pos += 8;
    auto nbytes = checked_mul(count, dtype_itemsize(s.dtype));
    if (!nbytes) fail(path, "legacy storage '" + key + "': byte size overflows 64 bits");
    if (count != s.numel)
      fail(path, "legacy storage '" + key + "' holds " + num(count) + " elements but its pickle declares " +
                     num(s.numel));
    file->span(pos, *nbytes, "legacy storage '" + key + "' data");
    storages[i].file_offset = pos;
    storages[i].nbytes = *nbytes;
    pos += *nbytes;
  }
  for (size_t i = 0; i < storages.size(); ++i) {
    if (!seen[i] && vm.storages()[i].view_root.empty())
      fail(path, "legacy storage '" + storages[i].key + "' has no data in the file");
  }
  resolve_views(path, vm, storages);
  return finish(std::move(file), "torch_legacy", vm, root, std::move(storages));
}

}  // namespace fastckpt
