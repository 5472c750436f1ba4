// libFuzzer target: the safetensors header parser.
#include "formats/safetensors_reader.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return fastckpt::fuzzing::run_reader(data, size, fastckpt::read_safetensors);
}
