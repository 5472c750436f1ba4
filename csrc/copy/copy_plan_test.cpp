// Tests of copy-plan validation (copy/copy_plan.h): validate_task accepts a
// consistent task and refuses each kind of inconsistency with a CheckpointError
// naming the file, the task and what is wrong, before any byte is copied.
#include "copy/copy_plan.h"

#include <unistd.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tests/check.h"

using namespace fastckpt;
using namespace fastckpt::testing;

namespace {

// A 4 x 3 F32 source filling a 48-byte storage at offset 16 of a 64-byte file,
// copied whole into a 4 x 3 F32 destination.
struct Fixture {
  std::string path = temp_file(std::string(64, 'x'));
  std::vector<float> dst = std::vector<float>(64);
  CopyTask task;
  Fixture() {
    task.label = "w -> model.w";
    task.file = MappedFile::open(path);
    task.storage_file_offset = 16;
    task.storage_nbytes = 48;
    task.src_dtype = DType::F32;
    task.src_shape = std::vector<int64_t>{4, 3};
    task.src_strides = std::vector<int64_t>{3, 1};
    task.dst_dtype = DType::F32;
    task.dst = reinterpret_cast<uint8_t*>(dst.data());
    task.dst_shape = std::vector<int64_t>{4, 3};
    task.dst_strides = std::vector<int64_t>{3, 1};
  }
  ~Fixture() { ::unlink(path.c_str()); }
};

// Runs validate_task on a fixture changed by `change`; the error text or "".
std::string refusal(const std::function<void(CopyTask&)>& change) {
  Fixture f;
  change(f.task);
  return error_of([&] { validate_task(f.task); });
}

void expect_refused(const std::function<void(CopyTask&)>& change, const std::string& part,
                    const std::string& what) {
  const std::string msg = refusal(change);
  // Every refusal names the file and the task, then says what is wrong.
  expect(contains(msg, "fastckpt_native_") && contains(msg, "w -> model.w: ") && contains(msg, part),
         what + " (" + msg + ")");
}

}  // namespace

FASTCKPT_TEST(test_copy_plan_accepts_consistent_tasks) {
  expect(refusal([](CopyTask&) {}).empty(), "a whole-tensor task is valid");
  expect(refusal([](CopyTask& t) {
           t.rows.kind = RowSelection::Kind::Range;
           t.rows.start = 1;
           t.rows.count = 2;
           t.dst_shape = std::vector<int64_t>{2, 3};
         }).empty(),
         "rows [1:3] into a 2 x 3 destination are valid");
  expect(refusal([](CopyTask& t) {
           t.rows.kind = RowSelection::Kind::Index;
           t.rows.index = {3, 0, 3};
           t.dst_shape = std::vector<int64_t>{3, 3};
         }).empty(),
         "row indices (repeated too) into a 3 x 3 destination are valid");
  expect(refusal([](CopyTask& t) {
           t.src_dtype = DType::BF16;
           t.storage_nbytes = 24;
           t.via_dtype = DType::F16;
           t.dst_dtype = DType::F64;
         }).empty(),
         "BF16 through F16 into F64 is a supported cast");
  expect(refusal([](CopyTask& t) {
           t.src_shape = std::vector<int64_t>{3, 4};
           t.src_strides = std::vector<int64_t>{1, 3};  // a transposed view of the same storage
           t.dst_shape = std::vector<int64_t>{3, 4};
           t.dst_strides = std::vector<int64_t>{4, 1};
         }).empty(),
         "a transposed source view inside its storage is valid");
  expect(refusal([](CopyTask& t) {
           t.src_shape = std::vector<int64_t>{0, 3};
           t.dst_shape = std::vector<int64_t>{0, 3};
           t.storage_nbytes = 0;
         }).empty(),
         "an empty tensor needs no storage");
}

FASTCKPT_TEST(test_copy_plan_refuses_inconsistent_tasks) {
  expect_refused([](CopyTask& t) { t.src_strides = std::vector<int64_t>{1}; },
                 "source shape and strides differ in rank", "source rank mismatch");
  expect_refused([](CopyTask& t) { t.dst_strides = std::vector<int64_t>{3, 1, 1}; },
                 "destination shape and strides differ in rank", "destination rank mismatch");
  expect_refused([](CopyTask& t) { t.src_shape = std::vector<int64_t>{-4, 3}; },
                 "negative source dimension", "negative source dimension");
  expect_refused([](CopyTask& t) { t.dst_strides = std::vector<int64_t>{-3, 1}; },
                 "negative destination dimension or stride", "negative destination stride");
  expect_refused(
      [](CopyTask& t) {
        t.rows.kind = RowSelection::Kind::Range;
        t.rows.start = 3;
        t.rows.count = 2;
        t.dst_shape = std::vector<int64_t>{2, 3};
      },
      "rows [3:5] lie outside the source's 4 rows", "a row range past the end");
  expect_refused(
      [](CopyTask& t) {
        t.rows.kind = RowSelection::Kind::Range;
        t.rows.start = 1;
        t.rows.count = std::numeric_limits<int64_t>::max();
      },
      "lie outside the source's 4 rows", "a row count that would overflow start + count");
  expect_refused(
      [](CopyTask& t) {
        t.rows.kind = RowSelection::Kind::Index;
        t.rows.index = {0, 4};
        t.dst_shape = std::vector<int64_t>{2, 3};
      },
      "row index 4 lies outside the source's 4 rows", "a row index past the end");
  expect_refused(
      [](CopyTask& t) {
        t.rows.kind = RowSelection::Kind::Index;
        t.rows.index = {-1};
        t.dst_shape = std::vector<int64_t>{1, 3};
      },
      "row index -1 lies outside", "a negative row index");
  expect_refused(
      [](CopyTask& t) {
        t.src_shape = Dims{};
        t.src_strides = Dims{};
        t.rows.kind = RowSelection::Kind::Range;
      },
      "a row selection needs a source with at least one dimension", "rows of a scalar");
  expect_refused([](CopyTask& t) { t.dst_shape = std::vector<int64_t>{3, 4}; },
                 "source shape [4, 3] does not match destination shape [3, 4]", "shape mismatch");
  expect_refused(
      [](CopyTask& t) {
        t.rows.kind = RowSelection::Kind::Range;
        t.rows.start = 0;
        t.rows.count = 2;
      },
      "source shape [2, 3] does not match destination shape [4, 3]",
      "the shape after the row selection is what must match");
  expect_refused(
      [](CopyTask& t) {
        t.src_dtype = DType::I64;
        t.storage_nbytes = 96;
        t.dst_dtype = DType::I8;
      },
      "cannot cast I64 to I8", "a narrowing integer cast");
  expect_refused(
      [](CopyTask& t) {
        t.via_dtype = DType::I32;
      },
      "cannot cast F32 to I32", "an unsupported cast through via_dtype");
  expect_refused(
      [](CopyTask& t) {
        t.dst_on_device = true;
        t.dst_strides = std::vector<int64_t>{1, 4};
      },
      "the destination on the device is not contiguous", "a strided device destination");
  expect_refused([](CopyTask& t) { t.src_offset = 1; }, "source reaches past the end of its storage",
                 "a source offset by one element past its storage");
  expect_refused([](CopyTask& t) { t.src_strides = std::vector<int64_t>{4, 1}; },
                 "source reaches past the end of its storage", "strides that reach past the storage");
  expect_refused([](CopyTask& t) { t.src_strides = std::vector<int64_t>{3, -1}; },
                 "negative source stride", "a negative source stride");
  expect_refused(
      [](CopyTask& t) {
        t.src_shape = std::vector<int64_t>{5, 3};
        t.dst_shape = std::vector<int64_t>{5, 3};
        t.src_strides = std::vector<int64_t>{int64_t{1} << 62, 1};  // 4 * 2^62 = 2^64
      },
      "source extent overflows", "a source extent that overflows 64 bits");
  expect_refused([](CopyTask& t) { t.storage_file_offset = 32; },
                 "source storage lies outside the file", "a storage past the end of the file");
}

FASTCKPT_TEST(test_copy_plan_is_dense) {
  expect(is_dense(std::vector<int64_t>{4, 3}, std::vector<int64_t>{3, 1}), "row-major is dense");
  expect(is_dense(std::vector<int64_t>{4, 1, 3}, std::vector<int64_t>{3, 99, 1}),
         "a size-1 dimension's stride does not matter");
  expect(!is_dense(std::vector<int64_t>{3, 4}, std::vector<int64_t>{1, 3}), "a transposed view is not dense");
  expect(!is_dense(std::vector<int64_t>{4, 3}, std::vector<int64_t>{4, 1}), "a padded row is not dense");
  expect(is_dense(Dims{}, Dims{}) && element_count(Dims{}) == 1, "a scalar is dense, one element");
  expect(element_count(std::vector<int64_t>{4, 0, 3}) == 0, "a zero dimension: no elements");
}
