// Tests of the DCP .metadata reader (formats/dcp_metadata.h) on pickles written
// byte by byte: a minimal Metadata reads back as records; the DCP global policy
// refuses any other global by name; chunks that overlap, leave gaps or lie
// outside their tensor, and chunks without a storage entry, are CheckpointErrors.
#include "formats/dcp_metadata.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

namespace {

const std::string kMeta = "torch.distributed.checkpoint.metadata";

std::string u32(uint32_t v) {
  std::string s(4, '\0');
  for (int i = 0; i < 4; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}
std::string str(const std::string& s) { return "X" + u32(static_cast<uint32_t>(s.size())) + s; }
std::string global(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
std::string ints(const std::vector<int>& v) {  // a tuple of small ints
  std::string s = "(";
  for (int x : v) s += "K" + std::string(1, static_cast<char>(x));
  return s + "t";
}
// A dataclass as pickle writes it: NEWOBJ of the class with (), then BUILD with its state.
std::string record(const std::string& module, const std::string& cls, const std::string& state) {
  return global(module, cls) + ")\x81" + state + "b";
}
std::string dict(const std::vector<std::pair<std::string, std::string>>& items) {
  std::string s = "}(";
  for (const auto& [k, v] : items) s += k + v;
  return s + "u";
}
std::string chunk(const std::vector<int>& offsets, const std::vector<int>& sizes) {
  return record(kMeta, "ChunkStorageMetadata", dict({{str("offsets"), ints(offsets)}, {str("sizes"), ints(sizes)}}));
}
std::string storage_entry(const std::vector<int>& offsets) {
  const std::string key = record(kMeta, "MetadataIndex", dict({{str("fqn"), str("w")}, {str("offset"), ints(offsets)}}));
  const std::string info = record("torch.distributed.checkpoint.filesystem", "_StorageInfo",
                                  dict({{str("relative_path"), str("__0_0.distcp")}, {str("offset"), std::string("K\0", 2)},
                                        {str("length"), "K\x10"}}));
  return key + info;
}

// Metadata of one float32 tensor "w" of size (4, 2) stored in `chunks`, each with a storage entry.
std::string metadata(const std::vector<std::pair<std::vector<int>, std::vector<int>>>& chunks,
                     const std::string& extra_planner_value = "") {
  std::string list = "](";
  std::string storage = "}(";
  for (const auto& [o, s] : chunks) {
    list += chunk(o, s);
    storage += storage_entry(o);
  }
  list += "e";
  storage += "u";
  // TensorProperties' __getstate__ tuple: (dtype, _get_layout("torch.strided"), ...).
  const std::string layout = global("torch.serialization", "_get_layout") + str("torch.strided") + "\x85R";
  const std::string props = global(kMeta, "TensorProperties") + ")\x81(" + global("torch", "float32") + layout + "tb";
  const std::string tensor =
      record(kMeta, "TensorStorageMetadata",
             dict({{str("properties"), props}, {str("size"), ints({4, 2})}, {str("chunks"), list}}));
  std::string planner = "}(" + str("w") + "(" + str("model") + str("w") + "t";
  if (!extra_planner_value.empty()) planner += str("x") + extra_planner_value;
  planner += "u";
  return "\x80\x04" + record(kMeta, "Metadata",
                             dict({{str("state_dict_metadata"), dict({{str("w"), tensor}})},
                                   {str("storage_data"), storage},
                                   {str("planner_data"), planner}})) +
         ".";
}

std::string parse_error(const std::string& bytes) {
  return error_of([&] {
    parse_dcp_metadata(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "/ckpt/.metadata");
  });
}

}  // namespace

FASTCKPT_TEST(test_dcp_metadata_reads_records) {
  const std::string bytes = metadata({{{0, 0}, {2, 2}}, {{2, 0}, {2, 2}}});
  std::string error;
  DcpMetadata m;
  error = error_of([&] {
    m = parse_dcp_metadata(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "/ckpt/.metadata");
  });
  bool ok = error.empty() && m.items.size() == 1 && m.storage.size() == 2;
  if (ok) {
    const DcpItem& w = m.items[0];
    ok = w.fqn == "w" && w.path == std::vector<std::string>{"model", "w"} && w.dtype == "F32" &&
         w.size.size() == 2 && w.size[0] == 4 && w.chunks.size() == 2 && w.chunks[1].offsets[0] == 2 &&
         m.storage[w.chunks[1].storage].relative_path == "__0_0.distcp" && m.storage[0].length == 16;
  }
  expect(ok, "a Metadata of one tensor in two chunks reads back as its records (" + error + ")");
}

FASTCKPT_TEST(test_dcp_metadata_refuses_other_globals_by_name) {
  const std::string counter = global("collections", "Counter") + ")\x81";
  std::string e = parse_error(metadata({{{0, 0}, {4, 2}}}, counter));
  expect(contains(e, "/ckpt/.metadata: the metadata pickle at byte ") &&
             contains(e, "refers to 'collections.Counter', which a DCP .metadata file does not hold"),
         "collections.Counter refuses the file by name: " + e);
  e = parse_error(metadata({{{0, 0}, {4, 2}}}, global("os", "system") + str("true") + "\x85R"));
  expect(contains(e, "refers to 'os.system', which only code-executing pickles use"), "os.system refused: " + e);
}

FASTCKPT_TEST(test_dcp_metadata_refuses_chunks_that_do_not_tile) {
  std::string e = parse_error(metadata({{{0, 0}, {3, 2}}, {{2, 0}, {2, 2}}}));
  expect(contains(e, "tensor 'w': chunks at offsets (0, 0) and (2, 0) overlap"), "overlap: " + e);
  e = parse_error(metadata({{{0, 0}, {2, 2}}}));
  expect(contains(e, "tensor 'w': its chunks hold 4 of its 8 elements"), "gap: " + e);
  e = parse_error(metadata({{{0, 0}, {4, 2}}, {{4, 0}, {1, 2}}}));
  expect(contains(e, "chunk at offsets (4, 0) of 'w' (sizes (1, 2)) lies outside the tensor's size (4, 2)"),
         "outside: " + e);
}
