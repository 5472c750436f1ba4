#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string_view>
#include <vector>
#include <utility>

#include "bindings/bindings.h"
#include "bindings/targets.h"
#include "common/error.h"
#include "copy/cast.h"
#include "copy/copy_engine.h"
#include "copy/populate.h"
#include "formats/checkpoint_index.h"
#include "io/file_view.h"
#include "io/mapped_file.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

DType dtype_arg(const std::string& name) {
  auto d = dtype_from_name(name);
  if (!d) throw py::value_error("unknown dtype name '" + name + "'");
  return *d;
}

// The names cast(kernel=...) takes.
constexpr std::pair<const char*, CastKernels> kCastKernelNames[] = {
    {"best", CastKernels::Best}, {"avx512", CastKernels::Avx512}, {"avx2", CastKernels::Avx2},
    {"portable", CastKernels::Portable}};

CastKernels cast_kernels_arg(const std::string& name) {
  for (const auto& [n, set] : kCastKernelNames) {
    if (name != n) continue;
    if (!cast_kernels_available(set)) throw py::value_error("this CPU cannot run the '" + name + "' cast kernels");
    return set;
  }
  throw py::value_error("unknown cast kernel set '" + name + "' (best, avx512, avx2 or portable)");
}

// The source side of a task: the tensor's storage bytes and view within its file.
void set_source(CopyTask& t, const CheckpointIndex& index, size_t tensor_index) {
  const auto& rec = index.tensors.at(tensor_index);
  const auto& storage = index.storages.at(rec.storage);
  t.file = index.file;
  t.storage_file_offset = storage.file_offset;
  t.storage_nbytes = storage.nbytes;
  t.src_dtype = rec.dtype;
  t.src_shape = rec.shape;
  t.src_strides = rec.strides;
  t.src_offset = rec.storage_offset;
}

void set_rows(CopyTask& t, const py::handle& rows) {
  if (rows.is_none()) return;
  if (py::isinstance<py::tuple>(rows)) {
    auto range = rows.cast<std::pair<int64_t, int64_t>>();
    t.rows.kind = RowSelection::Kind::Range;
    t.rows.start = range.first;
    t.rows.count = range.second;
  } else {
    t.rows.kind = RowSelection::Kind::Index;
    t.rows.index = rows.cast<std::vector<int64_t>>();
  }
}

// Tasks and the one block of text their labels view.
struct LabeledTasks {
  std::vector<CopyTask> tasks;
  std::shared_ptr<std::string> text = std::make_shared<std::string>();
  std::vector<std::pair<size_t, size_t>> spans;  // per task: offset and length in text

  void end_label(size_t start) { spans.emplace_back(start, text->size() - start); }
  // Points every label into the finished text (it must not grow after this).
  std::unique_ptr<CopyEngine> engine(EngineOptions options, std::unique_ptr<DeviceSink> sink) && {
    const std::string_view all(*text);
    for (size_t i = 0; i < tasks.size(); ++i) tasks[i].label = all.substr(spans[i].first, spans[i].second);
    return std::make_unique<CopyEngine>(std::move(tasks), options, std::move(sink), std::move(text));
  }
};

// One task from Python: (index, tensor_i, rows, via, dst_ptr, dst_dtype, dst_shape,
// dst_strides, on_device, label). rows: None | (start, count) | list of row indices.
CopyTask task_from_tuple(const py::tuple& spec, LabeledTasks& out) {
  if (spec.size() != 10) throw py::value_error("a copy task is a 10-tuple");
  CopyTask t;
  const size_t start = out.text->size();
  *out.text += spec[9].cast<std::string>();
  out.end_label(start);
  set_source(t, spec[0].cast<const CheckpointIndex&>(), spec[1].cast<size_t>());
  set_rows(t, spec[2]);
  if (!spec[3].is_none()) t.via_dtype = dtype_arg(spec[3].cast<std::string>());
  t.dst = reinterpret_cast<uint8_t*>(spec[4].cast<uintptr_t>());
  t.dst_dtype = dtype_arg(spec[5].cast<std::string>());
  t.dst_shape = spec[6].cast<std::vector<int64_t>>();
  t.dst_strides = spec[7].cast<std::vector<int64_t>>();
  t.dst_on_device = spec[8].cast<bool>();
  return t;
}

// Appends Python's repr() of a name, as the labels built in Python used to read;
// the plain case (printable ASCII, no quote or backslash) without a Python call.
void append_quoted(std::string& out, const py::handle& name) {
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(name.ptr(), &n);
  if (s == nullptr) throw py::error_already_set();
  for (Py_ssize_t k = 0; k < n; ++k) {
    const auto c = static_cast<unsigned char>(s[k]);
    if (c < 0x20 || c > 0x7e || c == '\'' || c == '\\') {
      out += py::repr(name).cast<std::string>();
      return;
    }
  }
  out += '\'';
  out.append(s, static_cast<size_t>(n));
  out += '\'';
}

std::string quoted(const py::handle& name) {
  std::string out;
  append_quoted(out, name);
  return out;
}

// sources[i] (file_index << 32 | tensor_index) without pybind11's generic cast.
uint64_t source_location(const py::list& sources, size_t i) {
  const unsigned long long loc = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(sources.ptr(), static_cast<Py_ssize_t>(i)));
  if (loc == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return loc;
}

// A task's source view replaced by (offset, shape, strides) in elements of the
// source's storage: a slice, transpose or shard of the checkpoint tensor.
// validate_task checks it stays inside the storage.
void set_view(CopyTask& t, const py::handle& view) {
  auto v = view.cast<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>>>();
  if (std::get<0>(v) < 0) throw CheckpointError("a source view starts before its storage");
  if (std::get<1>(v).size() != std::get<2>(v).size())
    throw CheckpointError("a source view's shape and strides differ in rank");
  t.src_offset = static_cast<uint64_t>(std::get<0>(v));
  t.src_shape = std::get<1>(v);
  t.src_strides = std::get<2>(v);
}

// Tasks for a whole model in one call, from the destinations read once into
// `targets` (one Python tuple per tensor cost more than the copy itself for 30k
// small tensors). sources[i] is file_index << 32 | tensor_index; rows / vias /
// views are None or per-task lists.
LabeledTasks tasks_from_targets(const py::list& indexes, const py::list& sources,
                                const Targets& targets, const py::list& names,
                                const py::object& source_names, const py::object& rows,
                                const py::object& vias, const py::object& views,
                                bool on_device) {
  const size_t n = targets.items.size();
  if (sources.size() != n || names.size() != n)
    throw py::value_error("sources, targets and names differ in length");
  std::vector<const CheckpointIndex*> files;
  for (const auto& i : indexes) files.push_back(&i.cast<const CheckpointIndex&>());
  const py::list src_names = source_names.is_none() ? names : source_names.cast<py::list>();
  const py::list row_list = rows.is_none() ? py::list() : rows.cast<py::list>();
  const py::list via_list = vias.is_none() ? py::list() : vias.cast<py::list>();
  const py::list view_list = views.is_none() ? py::list() : views.cast<py::list>();
  if (src_names.size() != n || (!rows.is_none() && row_list.size() != n) ||
      (!vias.is_none() && via_list.size() != n) || (!views.is_none() && view_list.size() != n))
    throw py::value_error("per-task lists differ in length");
  LabeledTasks out;
  out.tasks.resize(n);
  out.spans.reserve(n);
  size_t label_chars = 0;  // code points: the text's size exactly when the names are ASCII
  for (size_t i = 0; i < n; ++i) {
    for (const py::list* list : {&src_names, &names}) {
      PyObject* name = PyList_GET_ITEM(list->ptr(), static_cast<Py_ssize_t>(i));
      if (!PyUnicode_Check(name)) throw py::type_error("task names must be strings");
      label_chars += static_cast<size_t>(PyUnicode_GET_LENGTH(name)) + 4;
    }
  }
  out.text->reserve(label_chars);
  for (size_t i = 0; i < n; ++i) {
    CopyTask& t = out.tasks[i];
    const Target& dst = targets.items[i];
    const uint64_t loc = source_location(sources, i);
    const size_t fi = static_cast<size_t>(loc >> 32);
    if (fi >= files.size()) throw py::index_error("source file index out of range");
    const py::handle dst_name = PyList_GET_ITEM(names.ptr(), static_cast<Py_ssize_t>(i));
    const size_t start = out.text->size();
    append_quoted(*out.text, PyList_GET_ITEM(src_names.ptr(), static_cast<Py_ssize_t>(i)));
    *out.text += " -> ";
    append_quoted(*out.text, dst_name);
    out.end_label(start);
    set_source(t, *files[fi], static_cast<size_t>(loc & 0xFFFFFFFFu));
    if (!views.is_none() && !view_list[i].is_none()) set_view(t, view_list[i]);
    if (!rows.is_none()) set_rows(t, row_list[i]);
    if (!vias.is_none() && !via_list[i].is_none()) t.via_dtype = dtype_arg(via_list[i].cast<std::string>());
    if (!dst.dtype)
      throw CheckpointError(quoted(dst_name) + " has dtype " +
                            py::str(targets.dtype_objects.at(dst.dtype_object)).cast<std::string>() +
                            ", which fastckpt cannot load into");
    t.dst = dst.ptr;
    t.dst_shape = dst.shape;
    t.dst_strides = dst.strides;
    t.dst_dtype = *dst.dtype;
    t.dst_on_device = on_device;
    for (size_t d = 0; d < t.dst_shape.size(); ++d)
      if (t.dst_strides[d] == 0 && t.dst_shape[d] > 1)
        throw CheckpointError(quoted(dst_name) +
                              " has overlapping memory (an expanded tensor); it cannot be loaded into");
  }
  return out;
}

std::unique_ptr<DeviceSink> make_sink(const std::string& device_sink, const std::string& cudart_path,
                                      int device_index) {
  if (device_sink == "cuda") return make_cuda_sink(cudart_path, device_index, kDeviceSlots);
  if (device_sink == "host_loopback") return make_host_loopback_sink();
  if (!device_sink.empty()) throw py::value_error("unknown device sink '" + device_sink + "'");
  return nullptr;
}

EngineOptions engine_options(size_t threads, uint64_t max_host_bytes, bool exact_reads) {
  EngineOptions opt;
  opt.threads = threads;
  opt.max_host_bytes = max_host_bytes;
  opt.exact_reads = exact_reads;
  return opt;
}

}  // namespace

void register_copy(py::module_& m) {
  py::class_<CopyEngine>(m, "CopyJob")
      .def(py::init([](const py::list& specs, size_t threads, uint64_t max_host_bytes,
                       const std::string& device_sink, const std::string& cudart_path,
                       int device_index, bool exact_reads) {
             LabeledTasks out;
             out.tasks.reserve(specs.size());
             for (const auto& s : specs) out.tasks.push_back(task_from_tuple(s.cast<py::tuple>(), out));
             return std::move(out).engine(engine_options(threads, max_host_bytes, exact_reads),
                                          make_sink(device_sink, cudart_path, device_index));
           }),
           py::arg("tasks"), py::arg("threads"), py::arg("max_host_bytes"),
           py::arg("device_sink") = "", py::arg("cudart_path") = "", py::arg("device_index") = 0,
           py::arg("exact_reads") = false)
      .def_static(
          "from_targets",
          [](const py::list& indexes, const py::list& sources, const Targets& targets,
             const py::list& names, const py::object& source_names, const py::object& rows,
             const py::object& vias, size_t threads, uint64_t max_host_bytes,
             const std::string& device_sink, const std::string& cudart_path, int device_index,
             const py::object& views, bool exact_reads) {
            return tasks_from_targets(indexes, sources, targets, names, source_names, rows, vias,
                                      views, !device_sink.empty())
                .engine(engine_options(threads, max_host_bytes, exact_reads),
                        make_sink(device_sink, cudart_path, device_index));
          },
          py::arg("indexes"), py::arg("sources"), py::arg("targets"), py::arg("names"),
          py::arg("source_names"), py::arg("rows"), py::arg("vias"), py::arg("threads"), py::arg("max_host_bytes"), py::arg("device_sink") = "",
          py::arg("cudart_path") = "", py::arg("device_index") = 0, py::arg("views") = py::none(),
          py::arg("exact_reads") = false,
          "Tasks straight from destination tensors read into Targets (see tasks_from_targets).")
      // (task index, source dtype, destination dtype) of every task that converts.
      .def("casts",
           [](const CopyEngine& e) {
             py::list out;
             const auto& tasks = e.tasks();
             for (size_t i = 0; i < tasks.size(); ++i)
               if (tasks[i].src_dtype != tasks[i].dst_dtype)
                 out.append(py::make_tuple(i, std::string(dtype_name(tasks[i].src_dtype)),
                                           std::string(dtype_name(tasks[i].dst_dtype))));
             return out;
           })
      .def(
          "run",
          [](CopyEngine& e) {
            // The engine touches only C++ state, the mapped files and destination
            // memory the caller keeps alive: nothing Python-owned, so no GIL needed.
            py::gil_scoped_release release;
            e.run();
          },
          "Copy everything; returns when all bytes are in place.")
      .def_property_readonly("total_bytes", &CopyEngine::total_bytes)
      .def_property_readonly("bytes_done", &CopyEngine::bytes_done)
      .def_property_readonly("bytes_from_cache", &CopyEngine::bytes_from_cache,
                             "Source bytes copied straight out of the page cache, not read().");

  // Entry points only the tests use.
  py::module_ testing = m.def_submodule("_testing", "test-only entry points of the core");
  testing.def(
      "cached_pages",
      [](const std::string& path, uint64_t offset, uint64_t length) {
        return FileView::cached_pages(*MappedFile::open(path), offset, length);
      },
      py::arg("path"), py::arg("offset"), py::arg("length"),
      "Pages of the file's [offset, +length) in the page cache; -1 when the kernel cannot say "
      "(cachestat, Linux 6.5+).");

  // Scalar kernels, for tests that compare them with torch directly.
  testing.def("float_to_bf16", &float_to_bf16);
  testing.def("float_to_half", &float_to_half);
  // The kernel load_into would use for a from -> to cast, on raw bytes, or the
  // one of a given set: for tests that compare every cast pair and every set
  // with Tensor.to().
  testing.def(
      "cast",
      [](const py::bytes& src, const std::string& from, const std::string& to, const std::string& kernel,
         bool streaming) {
        const DType f = dtype_arg(from);
        const DType t = dtype_arg(to);
        const CastKernels set = cast_kernels_arg(kernel);
        const std::string_view in = src;
        if (in.size() % dtype_itemsize(f) != 0) throw py::value_error("source bytes are not whole elements");
        auto fn = streaming ? find_streaming_cast(f, t, set) : std::nullopt;
        if (!fn) fn = find_cast(f, t, set);
        if (!fn) throw CheckpointError(unsupported_cast_text(f, t));
        const size_t n = in.size() / dtype_itemsize(f);
        std::string out(n * dtype_itemsize(t), '\0');
        (*fn)(in.data(), out.data(), n);
        return py::bytes(out);
      },
      py::arg("src"), py::arg("from_dtype"), py::arg("to_dtype"), py::arg("kernel") = "best",
      py::arg("streaming") = false,
      "kernel: 'best' (what loads use), 'avx512', 'avx2' or 'portable' (ValueError where this CPU lacks it); "
      "streaming: the non-temporal-store kernel where the set has one.");
  m.def(
      "populate_for_writing",
      [](const std::vector<std::pair<uintptr_t, uint64_t>>& ranges, size_t threads) {
        std::vector<WritableRange> rs;
        rs.reserve(ranges.size());
        for (const auto& [address, bytes] : ranges) rs.push_back({reinterpret_cast<uint8_t*>(address), bytes});
        // Plain C++ on memory the caller keeps alive for the call: no Python object is touched.
        py::gil_scoped_release release;
        return populate_for_writing(rs, threads);
      },
      py::arg("ranges"), py::arg("threads"),
      "Faults in the whole pages of each (address, bytes) range of fresh anonymous memory "
      "(MADV_POPULATE_WRITE) over `threads` threads; the bytes populated (0 where the kernel "
      "refuses).");
  testing.def("cast_kernels", &cast_kernel_set, "Which cast kernels loads use: 'avx512', 'avx2+f16c' or 'portable'.");
  testing.def(
      "cast_kernel_sets",
      [] {
        std::vector<std::string> out;
        for (const auto& [name, set] : kCastKernelNames)
          if (set != CastKernels::Best && cast_kernels_available(set)) out.emplace_back(name);
        return out;
      },
      "The cast kernel sets this CPU runs, for cast(kernel=...).");
}

}  // namespace fastckpt::bindings
