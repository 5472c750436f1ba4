// fastckpt_scan FILE_OR_DIR...: opens each file with open_checkpoint_file (a
// file named *.metadata with read_dcp_metadata: a DCP directory's metadata) and
// prints one line per file: "ok N_TENSORS PATH" or "error MESSAGE". Exit status
// 1 when any file raised something other than CheckpointError (a bug: hostile
// input must give CheckpointError); crashes and sanitizer reports abort.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "common/error.h"
#include "formats/dcp_metadata.h"
#include "formats/open_checkpoint.h"
#include "touch_index.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    fs::path p(argv[i]);
    if (fs::is_directory(p)) {
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) files.push_back(e.path().string());
    } else {
      files.push_back(p.string());
    }
  }
  std::sort(files.begin(), files.end());
  size_t ok = 0, errors = 0, bugs = 0;
  for (const auto& f : files) {
    std::fflush(stdout);  // the last line names the file when something aborts
    try {
      if (f.size() >= 9 && f.compare(f.size() - 9, 9, ".metadata") == 0) {
        const auto meta = fastckpt::read_dcp_metadata(f);
        std::printf("ok %zu %s (DCP metadata records)\n", meta.items.size(), f.c_str());
        ++ok;
        continue;
      }
      auto index = fastckpt::open_checkpoint_file(f);
      const uint64_t sum = fastckpt::testing::touch_index(index);
      std::printf("ok %zu %s (byte sum %llu)\n", index.tensors.size(), f.c_str(),
                  static_cast<unsigned long long>(sum));
      ++ok;
    } catch (const fastckpt::CheckpointError& e) {
      std::printf("error %s\n", e.what());
      ++errors;
    } catch (const std::exception& e) {
      std::printf("BUG %s: %s (not a CheckpointError)\n", f.c_str(), e.what());
      ++bugs;
    }
  }
  std::printf("scanned %zu files: %zu ok, %zu CheckpointError, %zu other exceptions\n",
              files.size(), ok, errors, bugs);
  return bugs == 0 && !files.empty() ? 0 : 1;
}
