// libFuzzer target: the zip directory reader and, through data.pkl, the pickle VM.
#include "formats/torch_reader.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fastckpt::fuzzing::run_reader(data, size, fastckpt::read_torch_zip);
}
