#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string_view>

#include "bindings/bindings.h"
#include "common/error.h"
#include "formats/dcp_metadata.h"
#include "formats/open_checkpoint.h"
#include "formats/torch_reader.h"
#include "io/fault_guard.h"
#include "formats/pending_indexes.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

// The whole file as a 1-D uint8 buffer for torch.frombuffer. It holds the
// mapping alive for as long as any tensor made from it exists.
struct FileBuffer {
  std::shared_ptr<MappedFile> file;
};

// Straight to a tuple: py::cast of a vector builds a list first, and listing a
// checkpoint converts two of these per tensor.
py::tuple int_tuple(const Dims& v) {
  py::tuple out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = py::int_(v[k]);
  return out;
}

// One tensor's view of its storage, with the storage's place in the file:
// everything Checkpoint.info() and tensor() need, as named fields.
struct TensorView {
  std::string dtype;
  py::tuple shape;
  py::tuple strides;
  uint64_t storage_offset;  // elements
  size_t storage;           // storage index in the file
  std::string storage_key;
  uint64_t file_offset;     // of the storage
  uint64_t storage_nbytes;
};

TensorView tensor_view(const CheckpointIndex& i, size_t k) {
  const auto& t = i.tensors.at(k);
  const auto& s = i.storages.at(t.storage);
  return TensorView{std::string(dtype_name(t.dtype)), int_tuple(t.shape), int_tuple(t.strides), t.storage_offset,
                    t.storage, s.key, s.file_offset, s.nbytes};
}

// The index's records over the file at `path`, which must have the same size: a
// rank loading with read="once" puts the bytes other ranks read into a memory
// file and copies from it with the index it already parsed.
std::shared_ptr<CheckpointIndex> index_over(const CheckpointIndex& i, const std::string& path) {
  py::gil_scoped_release release;
  auto out = std::make_shared<CheckpointIndex>();
  out->file = MappedFile::open(path);
  if (out->file->size() != i.file->size())
    fail(path, "has " + std::to_string(out->file->size()) + " bytes, but the index is of " + i.path() +
                   " (" + std::to_string(i.file->size()) + " bytes)");
  out->format = i.format;
  out->storages = i.storages;
  out->tensors = i.tensors;
  out->unloadable = i.unloadable;
  out->metadata_json = i.metadata_json;
  index_names(*out);
  return out;
}

// A pickled value as plain Python data: containers, numbers, strings, bytes;
// io.BytesIO objects as their bytes; other objects as {"__object__": class,
// "state": ...}. Bounded in depth and in values visited (shared subtrees count per use).
class PlainValues {
 public:
  PlainValues(const pickle::PickleVM& vm, std::string label) : vm_(vm), label_(std::move(label)) {}

  py::object convert(const pickle::Value& v, size_t depth = 0) {
    using pickle::Kind;
    if (depth > 200) throw LimitError(label_ + ": value nests deeper than 200 levels");
    if (++visits_ > 1'000'000) throw LimitError(label_ + ": value has more than 1000000 parts");
    const auto& n = vm_.node(v);
    switch (v.kind) {
      case Kind::None: return py::none();
      case Kind::Bool: return py::bool_(v.i != 0);
      case Kind::Int: return py::int_(v.i);
      case Kind::Float: return py::float_(v.f);
      case Kind::BigInt:
        return py::module_::import("builtins").attr("int").attr("from_bytes")(
            py::bytes(n.text.data(), n.text.size()), "little", py::arg("signed") = true);
      case Kind::String: return py::str(n.text.data(), n.text.size());
      case Kind::Bytes: return py::bytes(n.text.data(), n.text.size());
      case Kind::List:
      case Kind::Set: {
        py::list out;
        for (const auto& item : n.items) out.append(convert(item, depth + 1));
        return std::move(out);
      }
      case Kind::Tuple: {
        py::list out;
        for (const auto& item : n.items) out.append(convert(item, depth + 1));
        return py::tuple(out);
      }
      case Kind::Dict: {
        py::dict out;
        for (size_t k = 0; k + 1 < n.items.size(); k += 2) {
          py::object key = convert(n.items[k], depth + 1);
          if (PyObject_Hash(key.ptr()) == -1) {
            PyErr_Clear();
            key = py::repr(key);
          }
          out[key] = convert(n.items[k + 1], depth + 1);
        }
        return std::move(out);
      }
      case Kind::Global: return py::dict(py::arg("__global__") = py::str(n.text.data(), n.text.size()));
      case Kind::Object: {
        const pickle::Value state = n.items[1];
        const bool bytes_io = n.text == "_io.BytesIO" || n.text == "io.BytesIO";
        if (bytes_io && state.kind == Kind::Tuple && !vm_.node(state).items.empty() &&
            vm_.node(state).items[0].kind == Kind::Bytes)
          return convert(vm_.node(state).items[0], depth + 1);
        return py::dict(py::arg("__object__") = py::str(n.text.data(), n.text.size()),
                        py::arg("state") = convert(state, depth + 1));
      }
      case Kind::Tensor:
      case Kind::Storage:
      case Kind::Unloadable: return py::dict(py::arg("__tensor__") = py::bool_(true));
    }
    return py::none();
  }

 private:
  const pickle::PickleVM& vm_;
  std::string label_;
  size_t visits_ = 0;
};

}  // namespace

void register_formats(py::module_& m) {
  py::class_<FileBuffer>(m, "FileBuffer", py::buffer_protocol())
      .def_buffer([](FileBuffer& b) {
        return py::buffer_info(b.file->data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.file->size())}, {1},
                               /*readonly=*/false);
      })
      .def_property_readonly("size", [](const FileBuffer& b) { return b.file->size(); });

  py::class_<TensorView>(m, "TensorView")
      .def_readonly("dtype", &TensorView::dtype)
      .def_readonly("shape", &TensorView::shape)
      .def_readonly("strides", &TensorView::strides)
      .def_readonly("storage_offset", &TensorView::storage_offset, "elements")
      .def_readonly("storage", &TensorView::storage, "storage index in the file")
      .def_readonly("storage_key", &TensorView::storage_key)
      .def_readonly("file_offset", &TensorView::file_offset, "byte offset of the storage in the file")
      .def_readonly("storage_nbytes", &TensorView::storage_nbytes);

  py::class_<CheckpointIndex, std::shared_ptr<CheckpointIndex>>(m, "FileIndex")
      .def_property_readonly("path", &CheckpointIndex::path)
      .def_readonly("format", &CheckpointIndex::format)
      .def_readonly("metadata_json", &CheckpointIndex::metadata_json)
      .def_property_readonly("file_size", [](const CheckpointIndex& i) { return i.file->size(); })
      .def("__len__", [](const CheckpointIndex& i) { return i.tensors.size(); })
      .def("names",
           [](const CheckpointIndex& i) {
             py::list out(i.tensors.size());
             for (size_t k = 0; k < i.tensors.size(); ++k) out[k] = py::str(i.tensors[k].name);
             return out;
           })
      .def("paths",
           [](const CheckpointIndex& i) {
             py::list out(i.tensors.size());
             for (size_t k = 0; k < i.tensors.size(); ++k) out[k] = py::tuple(py::cast(path_of(i.tensors[k])));
             return out;
           })
      // (name, container path, what it is) of every tensor listed but not loadable.
      .def("unloadable",
           [](const CheckpointIndex& i) {
             py::list out;
             for (const auto& u : i.unloadable) {
               const auto path = u.path.empty() ? std::vector<std::string>{u.name} : u.path;
               out.append(py::make_tuple(u.name, py::tuple(py::cast(path)), u.what));
             }
             return out;
           })
      // Storage index of every tensor: plain ints, cheap to build for 30k tensors.
      .def("tensor_storages",
           [](const CheckpointIndex& i) {
             py::list out(i.tensors.size());
             for (size_t k = 0; k < i.tensors.size(); ++k) out[k] = py::int_(i.tensors[k].storage);
             return out;
           })
      // Shape of every tensor, for checking a whole model's shapes in one call.
      .def("shapes",
           [](const CheckpointIndex& i) {
             py::list out(i.tensors.size());
             for (size_t k = 0; k < i.tensors.size(); ++k) out[k] = int_tuple(i.tensors[k].shape);
             return out;
           })
      // Longest container path: 1 for a flat state dict (no pick to make).
      .def("max_path_length",
           [](const CheckpointIndex& i) {
             size_t longest = 0;
             for (const auto& t : i.tensors) longest = std::max<size_t>(longest, t.path.empty() ? 1 : t.path.size());
             return longest;
           })
      .def("tensor_view", &tensor_view, py::arg("tensor"),
           "The tensor's dtype, shape, strides and storage offset, and its storage's place in the file.")
      .def_property_readonly("num_storages", [](const CheckpointIndex& i) { return i.storages.size(); })
      .def("buffer", [](const CheckpointIndex& i) { return FileBuffer{i.file}; })
      .def("drop_from_page_cache", [](const CheckpointIndex& i) { i.file->drop_from_page_cache(); })
      .def("over", &index_over, py::arg("path"),
           "The same tensors over another file of the same size (one holding their bytes).");

  // Where each name is among the files' tensors: file_index << 32 | tensor_index,
  // or None. Looked up in the maps built while the files were opened, so that
  // matching a 30k-tensor model needs no dict of the checkpoint's names.
  m.def(
      "locate",
      [](const std::vector<std::shared_ptr<CheckpointIndex>>& indexes, const py::list& names) {
        py::list out(names.size());
        for (size_t k = 0; k < names.size(); ++k) {
          Py_ssize_t n = 0;
          PyObject* item = PyList_GET_ITEM(names.ptr(), static_cast<Py_ssize_t>(k));
          if (!PyUnicode_Check(item)) throw py::type_error("names must be strings");
          const char* s = PyUnicode_AsUTF8AndSize(item, &n);
          if (s == nullptr) PyErr_Clear();  // not encodable (a lone surrogate): in no file
          const std::string_view name(s != nullptr ? s : "", static_cast<size_t>(n));
          py::object where = py::none();
          for (size_t fi = 0; s != nullptr && fi < indexes.size(); ++fi) {
            if (const uint32_t* ti = indexes[fi]->by_name.find(name)) {
              where = py::int_(static_cast<uint64_t>(fi) << 32 | *ti);
              break;
            }
          }
          out[k] = std::move(where);
        }
        return out;
      },
      py::arg("indexes"), py::arg("names"),
      "Per name, file_index << 32 | tensor_index of the first file holding it, or None.");

  m.def(
      "open_file",
      [](const std::string& path) {
        // Parsing touches only the C++ index and the mapping: safe without the GIL.
        py::gil_scoped_release release;
        return std::make_shared<CheckpointIndex>(open_checkpoint_file(path));
      },
      py::arg("path"), "Read one checkpoint file's index (safetensors, torch zip or legacy torch).");

  // torch.distributed.checkpoint: the .metadata records and the torch.save blobs of a .distcp file.
  py::class_<DcpChunk>(m, "DcpChunk")
      .def_property_readonly("offsets", [](const DcpChunk& c) { return int_tuple(c.offsets); })
      .def_property_readonly("sizes", [](const DcpChunk& c) { return int_tuple(c.sizes); })
      .def_readonly("storage", &DcpChunk::storage, "index into DcpMetadata.storage");
  py::class_<DcpItem>(m, "DcpItem")
      .def_readonly("fqn", &DcpItem::fqn, "the flattened key")
      .def_property_readonly("path", [](const DcpItem& i) { return py::tuple(py::cast(i.path)); },
                             "the key's path in the saved state dict (planner_data)")
      .def_readonly("is_bytes", &DcpItem::is_bytes)
      .def_readonly("dtype", &DcpItem::dtype, "fastckpt's dtype name; empty when unknown")
      .def_readonly("torch_dtype", &DcpItem::torch_dtype)
      .def_readonly("layout", &DcpItem::layout)
      .def_property_readonly("size", [](const DcpItem& i) { return int_tuple(i.size); })
      .def_readonly("chunks", &DcpItem::chunks)
      .def_readonly("storage", &DcpItem::storage, "bytes values: index into DcpMetadata.storage");
  py::class_<DcpStorage>(m, "DcpStorage")
      .def_readonly("relative_path", &DcpStorage::relative_path)
      .def_readonly("offset", &DcpStorage::offset)
      .def_readonly("length", &DcpStorage::length)
      .def_readonly("transforms", &DcpStorage::transforms);
  py::class_<DcpMetadata>(m, "DcpMetadata")
      .def_readonly("items", &DcpMetadata::items)
      .def_readonly("storage", &DcpMetadata::storage)
      .def_readonly("version", &DcpMetadata::version);
  m.def(
      "read_dcp_metadata",
      [](const std::string& path) {
        py::gil_scoped_release release;  // pure C++ over the mapped file
        return read_dcp_metadata(path);
      },
      py::arg("path"), "Read and check a torch.distributed.checkpoint .metadata file (nothing is imported or run).");
  m.def(
      "open_archives",
      [](const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& ranges,
         bool exact_reads) {
        py::gil_scoped_release release;  // pure C++ over the mapped file
        auto file = MappedFile::open(path);
        // A rank reading its shard touches each chunk's zip records only: without this,
        // each touch reads the device's whole readahead window (MBs) around them.
        if (exact_reads) file->advise_random();
        std::vector<std::shared_ptr<CheckpointIndex>> out;
        out.reserve(ranges.size());
        for (const auto& [base, length] : ranges) {
          auto index = guarded_read(file, [&](const std::shared_ptr<MappedFile>& f) {
            return read_torch_zip(f, base, length);
          });
          index_names(index);
          out.push_back(std::make_shared<CheckpointIndex>(std::move(index)));
        }
        return out;
      },
      py::arg("path"), py::arg("ranges"), py::arg("exact_reads") = false,
      "The torch.save archives at (offset, length) of one file, sharing one mapping of it.");

  m.def(
      "read_pickled_value",
      [](const std::string& path, uint64_t offset, uint64_t length) {
        ArchivePickle value;
        {
          py::gil_scoped_release release;  // pure C++ over the mapped file
          auto file = MappedFile::open(path);
          value = guarded_read(file, [&](const std::shared_ptr<MappedFile>& f) {
            return read_archive_pickle(*f, offset, length);
          });
        }
        return PlainValues(*value.vm, path).convert(value.root);
      },
      py::arg("path"), py::arg("offset"), py::arg("length"),
      "The torch.save'd value at (offset, length) of a file as plain Python data (nothing is run).");

  py::class_<PendingIndexes>(m, "PendingIndexes")
      .def("wait",
           [](PendingIndexes& p) {
             py::gil_scoped_release release;
             return p.wait();
           },
           "The files' indexes, in order, once all are read; or the first file's error.");

  m.def(
      "start_open",
      [](std::vector<std::string> paths, size_t threads, bool exact_reads) {
        return std::make_unique<PendingIndexes>(std::move(paths), threads, exact_reads);
      },
      py::arg("paths"), py::arg("threads"), py::arg("exact_reads") = false,
      "Start reading the files' indexes on background threads (no GIL needed); wait() for them.");
}

}  // namespace fastckpt::bindings
