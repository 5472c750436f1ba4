#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "bindings/bindings.h"
#include "common/error.h"
#include "copy/cast.h"
#include "copy/copy_engine.h"
#include "formats/checkpoint_index.h"

namespace py = pybind11;

namespace fastckpt::bindings {
namespace {

DType dtype_arg(const std::string& name) {
  auto d = dtype_from_name(name);
  if (!d) throw py::value_error("unknown dtype name '" + name + "'");
  return *d;
}

// One task from Python: (index, tensor_i, rows, via, dst_ptr, dst_dtype, dst_shape,
// dst_strides, on_device, label). rows: None | (start, count) | list of row indices.
CopyTask task_from_tuple(const py::tuple& spec) {
  if (spec.size() != 10) throw py::value_error("a copy task is a 10-tuple");
  const auto& index = spec[0].cast<const CheckpointIndex&>();
  const auto& rec = index.tensors.at(spec[1].cast<size_t>());
  const auto& storage = index.storages.at(rec.storage);
  CopyTask t;
  t.label = spec[9].cast<std::string>();
  t.file = index.file;
  t.storage_file_offset = storage.file_offset;
  t.storage_nbytes = storage.nbytes;
  t.src_dtype = rec.dtype;
  t.src_shape = rec.shape;
  t.src_strides = rec.strides;
  t.src_offset = rec.storage_offset;
  py::object rows = spec[2];
  if (py::isinstance<py::tuple>(rows)) {
    auto range = rows.cast<std::pair<int64_t, int64_t>>();
    t.rows.kind = RowSelection::Kind::Range;
    t.rows.start = range.first;
    t.rows.count = range.second;
  } else if (!rows.is_none()) {
    t.rows.kind = RowSelection::Kind::Index;
    t.rows.index = rows.cast<std::vector<int64_t>>();
  }
  if (!spec[3].is_none()) t.via_dtype = dtype_arg(spec[3].cast<std::string>());
  t.dst = reinterpret_cast<uint8_t*>(spec[4].cast<uintptr_t>());
  t.dst_dtype = dtype_arg(spec[5].cast<std::string>());
  t.dst_shape = spec[6].cast<std::vector<int64_t>>();
  t.dst_strides = spec[7].cast<std::vector<int64_t>>();
  t.dst_on_device = spec[8].cast<bool>();
  return t;
}

}  // namespace

void register_copy(py::module_& m) {
  py::class_<CopyEngine>(m, "CopyJob")
      .def(py::init([](const py::list& specs, size_t threads, uint64_t max_host_bytes,
                       const std::string& device_sink, const std::string& cudart_path,
                       int device_index, bool read_through_mapping) {
             std::vector<CopyTask> tasks;
             tasks.reserve(specs.size());
             for (const auto& s : specs) tasks.push_back(task_from_tuple(s.cast<py::tuple>()));
             std::unique_ptr<DeviceSink> sink;
             if (device_sink == "cuda") {
               sink = make_cuda_sink(cudart_path, device_index, 4);
             } else if (device_sink == "host_loopback") {
               sink = make_host_loopback_sink();
             } else if (!device_sink.empty()) {
               throw py::value_error("unknown device sink '" + device_sink + "'");
             }
             EngineOptions opt;
             opt.threads = threads;
             opt.max_host_bytes = max_host_bytes;
             opt.read_through_mapping = read_through_mapping;
             return std::make_unique<CopyEngine>(std::move(tasks), opt, std::move(sink));
           }),
           py::arg("tasks"), py::arg("threads"), py::arg("max_host_bytes"),
           py::arg("device_sink") = "", py::arg("cudart_path") = "", py::arg("device_index") = 0,
           py::arg("read_through_mapping") = false)
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
      .def_property_readonly("bytes_done", &CopyEngine::bytes_done);

  // Scalar kernels, for tests that compare them with torch directly.
  m.def("_float_to_bf16", &float_to_bf16);
  m.def("_float_to_half", &float_to_half);
}

}  // namespace fastckpt::bindings
