#include "formats/zip_reader.h"

#include <algorithm>
#include <cstring>

#include "common/checked_math.h"
#include "common/error.h"
#include "common/utf8.h"

namespace fastckpt {
namespace {

constexpr uint32_t kEocdSig = 0x06054b50;
constexpr uint32_t kZip64EocdSig = 0x06064b50;
constexpr uint32_t kZip64LocatorSig = 0x07064b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint64_t kEocdSize = 22;
constexpr uint64_t kZip64LocatorSize = 20;
constexpr uint64_t kZip64EocdSize = 56;
constexpr uint64_t kCentralSize = 46;
constexpr uint64_t kLocalSize = 30;
constexpr uint64_t kMaxComment = 0xFFFF;

uint16_t u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t u32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
         (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t u64(const uint8_t* p) { return static_cast<uint64_t>(u32(p)) | (static_cast<uint64_t>(u32(p + 4)) << 32); }

std::string num(uint64_t v) { return std::to_string(v); }

struct Eocd {
  uint64_t entries;
  uint64_t cd_size;
  uint64_t cd_offset;
};

// The archive's bytes [base, base + size) of a file; `path` labels errors.
struct Window {
  const MappedFile& file;
  uint64_t base;
  uint64_t size;
  const std::string& path;
  const uint8_t* span(uint64_t offset, uint64_t length, const std::string& what) const {
    if (!range_fits(offset, length, size))
      fail(path, what + " (" + num(length) + " bytes at offset " + num(offset) + ") lies past the end of the archive (" +
                     num(size) + " bytes)");
    return file.span(base + offset, length, what);
  }
};

// The last EOCD signature whose comment length ends exactly at the end of the
// archive; searches back over at most the largest comment plus the record.
uint64_t find_eocd(const Window& w) {
  const std::string& path = w.path;
  const uint64_t size = w.size;
  if (size < kEocdSize) fail(path, "too small to be a zip archive (" + num(size) + " bytes)");
  const uint8_t* base = w.span(0, size, "zip archive");
  const uint64_t lowest = size - kEocdSize > kMaxComment ? size - kEocdSize - kMaxComment : 0;
  for (uint64_t pos = size - kEocdSize + 1; pos-- > lowest;) {
    if (u32(base + pos) == kEocdSig && pos + kEocdSize + u16(base + pos + 20) == size) return pos;
  }
  fail(path, "zip end of central directory record not found (truncated or not a zip file)");
}

Eocd read_eocd(const Window& w) {
  const std::string& path = w.path;
  const uint64_t pos = find_eocd(w);
  const uint8_t* e = w.span(pos, kEocdSize, "zip end of central directory record");
  if (u16(e + 4) != 0 || u16(e + 6) != 0) fail(path, "multi-disk zip archives are not supported");
  Eocd r{u16(e + 10), u32(e + 12), u32(e + 16)};
  const bool needs_zip64 = r.entries == 0xFFFF || r.cd_size == 0xFFFFFFFF || r.cd_offset == 0xFFFFFFFF;
  const bool has_locator = pos >= kZip64LocatorSize && u32(e - kZip64LocatorSize) == kZip64LocatorSig;
  if (!has_locator) {
    if (needs_zip64) fail(path, "zip64 end of central directory locator is missing");
    return r;
  }
  const uint8_t* loc = e - kZip64LocatorSize;
  const uint64_t z_off = u64(loc + 8);
  const uint8_t* z = w.span(z_off, kZip64EocdSize, "zip64 end of central directory record");
  if (u32(z) != kZip64EocdSig) fail(path, "zip64 end of central directory record has a bad signature");
  if (u32(z + 16) != 0 || u32(z + 20) != 0) fail(path, "multi-disk zip archives are not supported");
  r.entries = u64(z + 32);
  r.cd_size = u64(z + 40);
  r.cd_offset = u64(z + 48);
  return r;
}

// Records must not overlap each other or the central directory. Each record
// takes at least its fixed local header, its name and its data (the local extra
// field can only add to that), so overlapping lower bounds prove a lie.
void check_no_overlap(const std::string& path, const std::vector<ZipEntry>& entries, uint64_t cd_offset) {
  struct Span {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  spans.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    auto end = checked_add(e.local_header_offset, kLocalSize + e.name.size());
    if (end) end = checked_add(*end, e.compressed_size);
    if (!end) fail(path, "record '" + std::string(e.name) + "': size overflows 64 bits");
    spans.push_back({e.local_header_offset, *end, i});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t k = 0; k < spans.size(); ++k) {
    const uint64_t limit = k + 1 < spans.size() ? spans[k + 1].begin : cd_offset;
    if (spans[k].end > limit) {
      const std::string next = k + 1 < spans.size() ? "record '" + std::string(entries[spans[k + 1].index].name) + "'"
                                                     : "the central directory";
      fail(path, "record '" + std::string(entries[spans[k].index].name) + "' (" + num(spans[k].end - spans[k].begin) +
                     " bytes at offset " + num(spans[k].begin) + ") overlaps " + next);
    }
  }
}

}  // namespace

ZipDirectory ZipDirectory::read(const MappedFile& file) { return read(file, 0, file.size()); }

ZipDirectory ZipDirectory::read(const MappedFile& file, uint64_t base, uint64_t length) {
  if (!range_fits(base, length, file.size()))
    fail(file.path(), "bytes [" + num(base) + ", +" + num(length) + ") lie past the end of the file (" +
                          num(file.size()) + " bytes)");
  ZipDirectory dir;
  dir.base_ = base;
  dir.size_ = length;
  dir.label_ = base == 0 && length == file.size()
                   ? file.path()
                   : file.path() + " (archive at bytes " + num(base) + ".." + num(base + length) + ")";
  const std::string& path = dir.label_;
  const Window w{file, base, length, dir.label_};
  const Eocd eocd = read_eocd(w);
  if (eocd.entries > kMaxZipEntries)
    throw LimitError(path + ": zip archive declares " + num(eocd.entries) + " records, more than the limit of " +
                     num(kMaxZipEntries));
  const uint8_t* cd = w.span(eocd.cd_offset, eocd.cd_size, "zip central directory");
  // Every central entry takes at least 46 bytes, so the count is bounded by the size too.
  if (eocd.entries > eocd.cd_size / kCentralSize)
    fail(path, "zip central directory (" + num(eocd.cd_size) + " bytes) is too small for " + num(eocd.entries) +
                   " records");

  dir.entries_.reserve(eocd.entries);
  uint64_t pos = 0;
  for (uint64_t i = 0; i < eocd.entries; ++i) {
    auto where = [i] { return "zip central directory entry " + num(i); };
    if (!range_fits(pos, kCentralSize, eocd.cd_size)) fail(path, where() + " is truncated");
    const uint8_t* c = cd + pos;
    if (u32(c) != kCentralSig) fail(path, where() + " has a bad signature");
    const uint64_t name_len = u16(c + 28), extra_len = u16(c + 30), comment_len = u16(c + 32);
    if (name_len > kMaxZipNameLength)
      throw LimitError(path + ": " + where() + " has a name of " + num(name_len) + " bytes, more than the limit of " +
                       num(kMaxZipNameLength));
    const uint64_t var_len = name_len + extra_len + comment_len;
    if (!range_fits(pos + kCentralSize, var_len, eocd.cd_size)) fail(path, where() + " is truncated");
    ZipEntry entry;
    entry.flags = u16(c + 8);
    entry.method = u16(c + 10);
    entry.compressed_size = u32(c + 20);
    entry.uncompressed_size = u32(c + 24);
    entry.local_header_offset = u32(c + 42);
    entry.name = std::string_view(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    if (!valid_utf8(c + kCentralSize, name_len)) fail(path, where() + " has a name that is not valid UTF-8");
    const uint16_t disk = u16(c + 34);

    // zip64 extended information: only the fields saturated in the entry, in this order.
    const uint8_t* extra = c + kCentralSize + name_len;
    for (uint64_t e = 0; e + 4 <= extra_len;) {
      const uint16_t id = u16(extra + e);
      const uint64_t len = u16(extra + e + 2);
      if (e + 4 + len > extra_len) fail(path, "record '" + std::string(entry.name) + "': extra field overruns its entry");
      if (id == 0x0001) {
        const uint8_t* f = extra + e + 4;
        uint64_t used = 0;
        auto take = [&](uint64_t& field) {
          if (used + 8 > len) fail(path, "record '" + std::string(entry.name) + "': zip64 extra field is too short");
          field = u64(f + used);
          used += 8;
        };
        if (entry.uncompressed_size == 0xFFFFFFFF) take(entry.uncompressed_size);
        if (entry.compressed_size == 0xFFFFFFFF) take(entry.compressed_size);
        if (entry.local_header_offset == 0xFFFFFFFF) take(entry.local_header_offset);
      }
      e += 4 + len;
    }
    if (disk != 0 && disk != 0xFFFF) fail(path, "record '" + std::string(entry.name) + "' lies on another disk");
    if (!range_fits(entry.local_header_offset, kLocalSize, length))
      fail(path, "record '" + std::string(entry.name) + "': local header offset " + num(entry.local_header_offset) +
                     " lies past the end of the " + (base == 0 && length == file.size() ? "file" : "archive") + " (" +
                     num(length) + " bytes)");
    dir.entries_.push_back(std::move(entry));
    pos += kCentralSize + var_len;
  }
  check_no_overlap(path, dir.entries_, eocd.cd_offset);
  if (dir.entries_.size() > UINT32_MAX) fail(path, "too many zip records (" + num(dir.entries_.size()) + ")");
  dir.by_name_.reserve(dir.entries_.size());
  for (size_t i = 0; i < dir.entries_.size(); ++i) {
    // The first record of a name wins, as in torch's reader.
    dir.by_name_.emplace(dir.entries_[i].name, static_cast<uint32_t>(i));
  }
  return dir;
}

const ZipEntry* ZipDirectory::find(std::string_view name) const {
  const uint32_t* found = by_name_.find(name);
  return found == nullptr ? nullptr : &entries_[*found];
}

uint64_t ZipDirectory::data_offset(const MappedFile& file, const ZipEntry& entry) const {
  // Called once per storage: messages are only built on failure.
  const std::string& path = label_.empty() ? file.path() : label_;
  auto where = [&] { return "record '" + std::string(entry.name) + "'"; };
  if (entry.flags & 0x1) fail(path, where() + " is encrypted");
  if (entry.method != 0)
    fail(path, where() + " is compressed (zip method " + num(entry.method) +
                   "); only stored records can be read in place");
  if (entry.compressed_size != entry.uncompressed_size)
    fail(path, where() + " is stored but its compressed and uncompressed sizes differ");
  // One pread per header rather than a touch of the mapping: torch's records are
  // spread over the whole file, and faulting one page per record in (and
  // tearing the mappings down again) costs more than copying ~100 bytes.
  // read() checked that the fixed part of the local header lies inside the file.
  uint8_t buf[kLocalSize + kMaxZipNameLength];
  const uint64_t want = std::min<uint64_t>(kLocalSize + entry.name.size(), size_ - entry.local_header_offset);
  file.pread_exact(buf, base_ + entry.local_header_offset, want);
  const uint8_t* l = buf;
  if (u32(l) != kLocalSig) fail(path, where() + " local header has a bad signature");
  const uint64_t name_len = u16(l + 26), extra_len = u16(l + 28);
  const uint64_t start = entry.local_header_offset + kLocalSize + name_len + extra_len;  // < 2^64: all terms small
  if (name_len != entry.name.size() || kLocalSize + name_len > want ||
      std::memcmp(l + kLocalSize, entry.name.data(), name_len) != 0)
    fail(path, where() + ": local header names a different record");
  if (!range_fits(start, entry.uncompressed_size, size_))
    fail(path, where() + " (" + num(entry.uncompressed_size) + " bytes at offset " + num(start) +
                   ") lies past the end of the " + (label_ == file.path() ? "file" : "archive") + " (" + num(size_) +
                   " bytes)");
  return base_ + start;
}

const uint8_t* ZipDirectory::data(const MappedFile& file, const ZipEntry& entry) const {
  const uint64_t start = data_offset(file, entry);
  return file.data() + start;
}

}  // namespace fastckpt
