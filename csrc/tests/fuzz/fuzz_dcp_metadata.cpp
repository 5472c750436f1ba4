// libFuzzer target: a torch.distributed.checkpoint .metadata file, i.e. the
// pickle VM under the DCP global policy and the record checks (chunks inside
// and tiling their tensor, storage entries, relative paths).
#include "formats/dcp_metadata.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    // Through a real file, as users' .metadata files are read.
    auto file = fastckpt::fuzzing::input_file(data, size);
    const fastckpt::DcpMetadata meta = fastckpt::read_dcp_metadata(file->path());
    (void)meta;
  } catch (const fastckpt::CheckpointError&) {
  }
  return 0;
}
