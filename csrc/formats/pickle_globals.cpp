#include "formats/pickle_globals.h"

#include <array>

#include "formats/pickle_vm.h"

namespace fastckpt {
namespace {

// Top-level modules whose objects are never data in a checkpoint.
constexpr std::array<std::string_view, 43> kCodeModules = {
    "os",         "posix",     "nt",        "subprocess", "sys",       "importlib", "shutil",
    "socket",     "pty",       "runpy",     "code",       "codeop",    "pickle",    "_pickle",
    "marshal",    "ctypes",    "webbrowser", "multiprocessing", "signal", "asyncio", "threading",
    "tempfile",   "io",        "_io",       "glob",       "platform",  "pydoc",     "timeit",
    "cProfile",   "profile",   "pdb",       "bdb",        "trace",     "inspect",   "shelve",
    "operator",   "functools", "urllib",    "http",       "types",
    // Python 2 spellings that protocol-2 pickles use (fix_imports maps them back).
    "commands",   "cPickle",   "popen2",
};

// builtins that are plain data types; every other builtin (eval, exec, getattr,
// __import__, open, compile, ...) refuses the file.
constexpr std::array<std::string_view, 14> kDataBuiltins = {
    "set",   "frozenset", "bytearray", "complex", "slice", "range", "int",
    "float", "str",       "bytes",     "bool",    "list",  "tuple", "dict",
};

// What DCP's .metadata names besides torch dtypes (see pickle_vm's dtype table).
constexpr std::array<std::string_view, 17> kDcpMetadataGlobals = {
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    // torch < 2.1 kept TensorProperties with the sharded tensor.
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.Size",
    "torch.serialization._get_layout",
    "pathlib.PosixPath",
    "pathlib.PurePosixPath",
    "pathlib.WindowsPath",
    "pathlib.PureWindowsPath",
};

}  // namespace

bool is_dcp_metadata_global(std::string_view qualified_name) {
  for (auto g : kDcpMetadataGlobals)
    if (qualified_name == g) return true;
  return pickle::dtype_from_torch_global(qualified_name).has_value();
}

bool is_code_execution_global(std::string_view qualified_name) {
  // An in-memory buffer is data (DCP pickles io.BytesIO values); the VM never calls it.
  if (qualified_name == "_io.BytesIO" || qualified_name == "io.BytesIO") return false;
  const size_t dot = qualified_name.find('.');
  const std::string_view module = qualified_name.substr(0, dot);
  if (module == "builtins" || module == "__builtin__") {
    // "builtins.set" -> "set"; anything nested ("builtins.a.b") is not a data type.
    const std::string_view name =
        dot == std::string_view::npos ? std::string_view{} : qualified_name.substr(dot + 1);
    for (auto ok : kDataBuiltins)
      if (name == ok) return false;
    return true;
  }
  for (auto m : kCodeModules)
    if (module == m) return true;
  return false;
}

}  // namespace fastckpt
