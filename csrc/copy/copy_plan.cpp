#include "copy/copy_plan.h"

#include "common/checked_math.h"
#include "common/error.h"
#include "copy/cast.h"

namespace fastckpt {

bool is_dense(const Dims& shape, const Dims& strides) {
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

uint64_t element_count(const Dims& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

void validate_task(const CopyTask& t) {
  const std::string& path = t.file->path();
  auto bad = [&](const std::string& what) { fail(path, std::string(t.label) + ": " + what); };
  if (t.src_strides.size() != t.src_shape.size()) bad("source shape and strides differ in rank");
  if (t.dst_strides.size() != t.dst_shape.size()) bad("destination shape and strides differ in rank");
  for (int64_t d : t.src_shape)
    if (d < 0) bad("negative source dimension");
  for (size_t i = 0; i < t.dst_shape.size(); ++i)
    if (t.dst_shape[i] < 0 || t.dst_strides[i] < 0) bad("negative destination dimension or stride");

  int64_t out_rows = t.src_shape.empty() ? 0 : t.src_shape[0];  // dim 0 after the row selection
  if (t.rows.kind != RowSelection::Kind::All) {
    if (t.src_shape.empty()) bad("a row selection needs a source with at least one dimension");
    const int64_t n_rows = t.src_shape[0];
    if (t.rows.kind == RowSelection::Kind::Range) {
      if (t.rows.start < 0 || t.rows.count < 0 || t.rows.start > n_rows ||
          t.rows.count > n_rows - t.rows.start) {
        // start + count may overflow for hostile numbers (UB): then say "start:+count".
        const auto stop = checked_add(static_cast<uint64_t>(t.rows.start), static_cast<uint64_t>(t.rows.count));
        const bool printable = t.rows.start >= 0 && t.rows.count >= 0 && stop && *stop <= static_cast<uint64_t>(INT64_MAX);
        bad("rows [" + std::to_string(t.rows.start) + ":" +
            (printable ? std::to_string(*stop) : "+" + std::to_string(t.rows.count)) +
            "] lie outside the source's " + std::to_string(n_rows) + " rows");
      }
      out_rows = t.rows.count;
    } else {
      for (int64_t r : t.rows.index)
        if (r < 0 || r >= n_rows)
          bad("row index " + std::to_string(r) + " lies outside the source's " +
              std::to_string(n_rows) + " rows");
      out_rows = static_cast<int64_t>(t.rows.index.size());
    }
  }
  bool same_shape = t.src_shape.size() == t.dst_shape.size();
  for (size_t i = 0; same_shape && i < t.src_shape.size(); ++i)
    same_shape = (i == 0 ? out_rows : t.src_shape[i]) == t.dst_shape[i];
  if (!same_shape) {
    std::vector<int64_t> out_shape = t.src_shape.vec();
    if (!out_shape.empty()) out_shape[0] = out_rows;
    bad("source shape " + shape_text(out_shape) + " does not match destination shape " +
        shape_text(t.dst_shape.vec()));
  }

  DType mid = t.via_dtype.value_or(t.src_dtype);
  if (!find_cast(t.src_dtype, mid)) bad(unsupported_cast_text(t.src_dtype, mid));
  if (!find_cast(mid, t.dst_dtype)) bad(unsupported_cast_text(mid, t.dst_dtype));

  if (t.dst_on_device && !is_dense(t.dst_shape, t.dst_strides))
    bad("the destination on the device is not contiguous; make it contiguous before loading");

  // Storage extent (readers validate their own tensors; tasks may come from elsewhere).
  if (element_count(t.src_shape) == 0) return;
  uint64_t last = t.src_offset;
  for (size_t i = 0; i < t.src_shape.size(); ++i) {
    if (t.src_strides[i] < 0) bad("negative source stride");
    auto step = checked_mul(static_cast<uint64_t>(t.src_shape[i] - 1),
                            static_cast<uint64_t>(t.src_strides[i]));
    auto sum = step ? checked_add(last, *step) : std::nullopt;
    if (!sum) bad("source extent overflows");
    last = *sum;
  }
  auto end = checked_mul(last + 1, dtype_itemsize(t.src_dtype));
  if (!end || *end > t.storage_nbytes) bad("source reaches past the end of its storage");
  if (!range_fits(t.storage_file_offset, t.storage_nbytes, t.file->size()))
    bad("source storage lies outside the file");
}

}  // namespace fastckpt
