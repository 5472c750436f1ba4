// Tests of FileView (io/file_view.h), the second, shared mapping through which
// the copy engine reads cached ranges: a file cut under it, read under a guard,
// gives zeros and MappedFile::pages_lost(), which the engine reports.
#include "io/file_view.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "io/fault_guard.h"
#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

FASTCKPT_TEST(test_file_view_truncated_under_guard) {
  const std::string path = temp_file(std::string(3 * 4096, 'a'));  // just written: cached
  auto file = MappedFile::open(path);
  auto view = FileView::open(*file, 0);
  if (!view) {
    expect(!FileView::supported(*file), "FileView::open fails only without cachestat");
    std::printf("SKIP FileView tests: this kernel has no cachestat(2)\n");
    ::unlink(path.c_str());
    return;
  }
  expect(view->cached(100, 2 * 4096) == view->data() + 100 && view->data()[100] == 'a',
         "a just-written range is cached and read through the view");
  if (::truncate(path.c_str(), 4096) != 0) std::abort();
  expect(view->cached(100, 2 * 4096) == nullptr, "a range cut off the file is no longer cached");
  int seen;
  bool faulted;
  {
    FaultGuard guard(*file, view->data(), view->size());
    const volatile uint8_t* last = view->data() + view->size() - 1;
    seen = *last;  // past the new end: SIGBUS, turned into a zero page
    faulted = guard.faulted();
  }
  expect(seen == 0 && faulted && file->pages_lost(),
         "a read of the view past the new end gives zeros and pages_lost(), no SIGBUS");
  view.reset();  // unmaps the view and the zero pages over it
  ::unlink(path.c_str());
}
