// Fresh destination memory made resident before the copies write it.
//
// A load into new tensors (a meta model loaded with device="cpu") takes a page
// fault on the first write of every 4 KB page. Taken among the copies' reads of
// the mapped checkpoint, those faults cost a third more CPU than faulting the
// same pages in ahead with madvise(MADV_POPULATE_WRITE), one call per range, on
// all the load's threads (bench/RESULTS.md, issue 26: MoE per fresh process).
// Kernels before 5.14 refuse the advice: the pages then fault as before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fastckpt {

struct WritableRange {
  uint8_t* data;
  uint64_t bytes;
};

// Makes the whole pages inside each range resident and writable, over `threads`
// threads; returns the bytes populated (0 where the kernel refuses the advice).
// The ranges must be anonymous memory the caller owns: a private file mapping
// would be copied on write.
uint64_t populate_for_writing(const std::vector<WritableRange>& ranges, size_t threads);

}  // namespace fastckpt
