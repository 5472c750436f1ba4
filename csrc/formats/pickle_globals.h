// Which pickle globals refuse a file outright. The VM never imports or calls
// anything, so this is policy, not protection: a checkpoint whose pickle names
// os.system or builtins.eval was made to execute code, and users are better
// served by an error naming the global than by tensors from a hostile file.
// Other unknown classes (argparse.Namespace, omegaconf, numpy) stay inert
// placeholders so fairseq-style checkpoints remain readable.
#pragma once

#include <string_view>

namespace fastckpt {

// True for globals only code-executing pickles use: os/subprocess/sys/...,
// builtins other than plain data types, operator/functools call helpers.
bool is_code_execution_global(std::string_view qualified_name);

}  // namespace fastckpt
