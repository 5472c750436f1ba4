#include "formats/pickle_globals.h"

#include <array>

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

}  // namespace

bool is_code_execution_global(std::string_view qualified_name) {
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
