#include "io/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/checked_math.h"
#include "common/error.h"

namespace fastckpt {
namespace {

std::string errno_text(int err) { return std::strerror(err); }

constexpr int kMaxIov = 1024;  // Linux's UIO_MAXIOV: buffers one preadv may take

}  // namespace

std::shared_ptr<MappedFile> MappedFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: " + errno_text(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path, "cannot stat: " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  auto size = static_cast<uint64_t>(st.st_size);
  uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      fail(path, "cannot mmap " + std::to_string(size) + " bytes: " + errno_text(err));
    }
    data = static_cast<uint8_t*>(p);
  }
  return std::shared_ptr<MappedFile>(new MappedFile(path, fd, size, data));
}

MappedFile::MappedFile(std::string path, int fd, uint64_t size, uint8_t* data)
    : path_(std::move(path)), fd_(fd), size_(size), data_(data) {}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(data_, size_);
  if (fd_ >= 0) ::close(fd_);
}

const uint8_t* MappedFile::span(uint64_t offset, uint64_t length, const std::string& what) const {
  if (!range_fits(offset, length, size_)) {
    fail(path_, what + ": bytes [" + std::to_string(offset) + ", +" + std::to_string(length) +
                    ") lie outside the file (" + std::to_string(size_) + " bytes)");
  }
  return data_ + offset;
}

void MappedFile::pread_exact(void* dst, uint64_t offset, uint64_t length) const {
  auto* out = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < length) {
    // Large reads are split: Linux caps one read at ~2 GiB anyway.
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(length - done, uint64_t{1} << 30));
    ssize_t n = ::pread(fd_, out + done, chunk, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path_, "read failed at offset " + std::to_string(offset + done) + ": " +
                      errno_text(errno));
    }
    if (n == 0) {
      fail(path_, "file ended at offset " + std::to_string(offset + done) +
                      " while reading; was it truncated or rewritten during the load?");
    }
    done += static_cast<uint64_t>(n);
  }
}

void MappedFile::preadv_exact(struct iovec* iov, int count, uint64_t offset) const {
  while (count > 0) {
    ssize_t n = ::preadv(fd_, iov, std::min(count, kMaxIov), static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path_, "read failed at offset " + std::to_string(offset) + ": " + errno_text(errno));
    }
    if (n == 0) {
      fail(path_, "file ended at offset " + std::to_string(offset) +
                      " while reading; was it truncated or rewritten during the load?");
    }
    offset += static_cast<uint64_t>(n);
    auto left = static_cast<size_t>(n);
    while (count > 0 && left >= iov->iov_len) {  // drop the buffers filled completely
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {  // a partly filled buffer: go on where it stopped
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
}

void MappedFile::advise_sequential(uint64_t offset, uint64_t length) const {
  ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                  POSIX_FADV_SEQUENTIAL);
  if (data_ != nullptr) ::madvise(data_, size_, MADV_NORMAL);
}

void MappedFile::advise_random() const {
  // Both hints are needed: POSIX_FADV_RANDOM stops read()'s readahead but not
  // a page fault's read-around (the disk's whole readahead window, 8 MB here,
  // around the faulting page), which only MADV_RANDOM on the mapping stops.
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_RANDOM);
  if (data_ != nullptr) ::madvise(data_, size_, MADV_RANDOM);
}

void MappedFile::advise_willneed(uint64_t offset, uint64_t length) const {
  ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                  POSIX_FADV_WILLNEED);
}

void MappedFile::drop_from_page_cache() const { ::posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }

}  // namespace fastckpt
