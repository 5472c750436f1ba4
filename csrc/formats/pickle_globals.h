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

// The globals torch.distributed.checkpoint's .metadata pickle names (torch
// 2.0-2.13, default planner and FileSystemWriter): its metadata dataclasses,
// torch.Size, dtypes, the layout and memory-format helpers and pathlib paths.
// A .metadata naming anything else is refused (GlobalPolicy): the VM reads the
// records as inert placeholders and calls none of them.
bool is_dcp_metadata_global(std::string_view qualified_name);

}  // namespace fastckpt
