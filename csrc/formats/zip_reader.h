// The central directory of a zip archive (zip64 included), as torch.save writes
// it: stored (uncompressed) records only. Every offset and size is checked
// against the file before it is used.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/flat_string_map.h"
#include "io/mapped_file.h"

namespace fastckpt {

// Bounds on what a central directory may declare, so a hostile file cannot make
// us allocate without limit. torch writes one record per storage (plus ~6).
inline constexpr uint64_t kMaxZipEntries = 16'000'000;
inline constexpr uint64_t kMaxZipNameLength = 4096;

struct ZipEntry {
  std::string_view name;  // views the mapped central directory: valid while the file is open
  uint64_t local_header_offset = 0;
  uint64_t compressed_size = 0;
  uint64_t uncompressed_size = 0;
  uint16_t method = 0;  // 0: stored
  uint16_t flags = 0;
};

class ZipDirectory {
 public:
  // Reads the End Of Central Directory record (and its zip64 twin) and every
  // central entry. The directory views the file's mapping: keep the file open. CheckpointError / LimitError name the file and the problem.
  static ZipDirectory read(const MappedFile& file);
  // The archive that fills the file's bytes [base, base + length) (a torch.save
  // blob inside a DCP .distcp file): its offsets count from `base`, errors name
  // the range, and data_offset() answers absolute file offsets.
  static ZipDirectory read(const MappedFile& file, uint64_t base, uint64_t length);


  const std::vector<ZipEntry>& entries() const { return entries_; }
  // The file's path, or for an archive inside a file its path and byte range.
  const std::string& label() const { return label_; }
  // nullptr when the archive has no record of that name.
  const ZipEntry* find(std::string_view name) const;

  // Absolute file offset of a stored record's data, from its LOCAL header (whose
  // name and extra-field lengths may differ from the central entry's). Checks
  // the method, the local header and that the data lies inside the file.
  uint64_t data_offset(const MappedFile& file, const ZipEntry& entry) const;
  // The record's bytes (stored records only).
  const uint8_t* data(const MappedFile& file, const ZipEntry& entry) const;

 private:
  std::vector<ZipEntry> entries_;
  FlatStringMap by_name_;
  uint64_t base_ = 0;  // where the archive starts in the file
  uint64_t size_ = 0;  // the archive's length
  std::string label_;  // the file's path, with the range for an archive inside it
};

}  // namespace fastckpt
