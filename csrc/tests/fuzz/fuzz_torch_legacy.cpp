// libFuzzer target: the legacy torch reader, i.e. the pickle VM on raw pickles
// (magic, protocol, sys info, the object pickle, storage keys) and the storages.
#include "formats/torch_reader.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fastckpt::fuzzing::run_reader(data, size, fastckpt::read_torch_legacy);
}
