// libFuzzer target: the zip directory reader and, through data.pkl, the pickle VM.
#include <memory>
#include <utility>

#include "formats/torch_reader.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // read_torch_zip also has a byte-range overload (DCP archives): name the whole-file one.
  return fastckpt::fuzzing::run_reader(
      data, size, [](std::shared_ptr<fastckpt::MappedFile> file) {
        return fastckpt::read_torch_zip(std::move(file));
      });
}
