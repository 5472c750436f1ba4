#include "io/fault_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "common/error.h"

namespace fastckpt {
namespace {

static_assert(std::atomic<bool>::is_always_lock_free, "the SIGBUS handler sets an atomic<bool>");

// The innermost guard of this thread. SIGBUS from a memory access is delivered
// to the faulting thread, so the handler sees the guards of the thread that faulted.
thread_local FaultGuard* t_innermost = nullptr;

std::mutex g_install_mutex;
struct sigaction g_previous{};
uintptr_t g_page_mask = 0;

// Set while a chained handler runs: a handler that re-raises into us (Python's
// faulthandler does, once it has put its own predecessor back) must not start a cycle.
volatile sig_atomic_t g_chaining = 0;

void die_by_default(int sig, const siginfo_t* info) {
  struct sigaction dfl{};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  // A fault repeats when the load restarts; a signal sent by kill/raise must be re-sent.
  if (info == nullptr || info->si_code <= 0) ::raise(sig);
}

void chain_to_previous(int sig, siginfo_t* info, void* ctx) {
  if (g_chaining != 0) {
    die_by_default(sig, info);
    return;
  }
  g_chaining = 1;
  if ((g_previous.sa_flags & SA_SIGINFO) != 0 && g_previous.sa_sigaction != nullptr) {
    g_previous.sa_sigaction(sig, info, ctx);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
             g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
  } else {
    // Default (or ignored, which cannot work for a fault): the process dies as it
    // would have without us.
    die_by_default(sig, info);
  }
  g_chaining = 0;
}

}  // namespace

struct FaultGuardAccess {
  // Async-signal context: only reads plain fields and calls mmap/sigaction.
  static void on_sigbus(int sig, siginfo_t* info, void* ctx) {
    // si_code > 0: raised by the kernel for a memory access, not sent by kill().
    if (info != nullptr && info->si_code > 0) {
      const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
      for (FaultGuard* g = t_innermost; g != nullptr; g = g->previous_) {
        const auto begin = reinterpret_cast<uintptr_t>(g->begin_);
        const uint64_t size = g->size_;
        if (begin == 0 || addr < begin || addr - begin >= size) continue;
        // Replace the lost pages, from the faulting one to the end of the mapping,
        // with zeros; the faulting load is restarted and reads them.
        // Flag first: a thread that reads the zeros below then already sees it set.
        g->file_.pages_lost_.store(true, std::memory_order_seq_cst);
        const uintptr_t page = addr & g_page_mask;
        void* p = ::mmap(reinterpret_cast<void*>(page), static_cast<size_t>(begin + size - page),
                         PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (p != MAP_FAILED) {
          g->faulted_ = 1;
          return;
        }
        break;
      }
    }
    chain_to_previous(sig, info, ctx);
  }

  static void install() {
    std::lock_guard<std::mutex> lock(g_install_mutex);
    struct sigaction current{};
    ::sigaction(SIGBUS, nullptr, &current);
    // Re-checked on every guard: something (faulthandler, a debugger) may have
    // replaced our handler since; we then chain to whatever is there now.
    if ((current.sa_flags & SA_SIGINFO) != 0 && current.sa_sigaction == &on_sigbus) return;
    g_page_mask = ~(static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE)) - 1);
    struct sigaction ours{};
    ours.sa_sigaction = &on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    g_previous = current;
    ::sigaction(SIGBUS, &ours, nullptr);
  }
};

FaultGuard::FaultGuard(const MappedFile& file) : FaultGuard(file, file.data(), file.size()) {}

FaultGuard::FaultGuard(const MappedFile& file, const uint8_t* begin, uint64_t size)
    : file_(file), begin_(begin), size_(size), previous_(t_innermost) {
  FaultGuardAccess::install();
  t_innermost = this;
}

FaultGuard::~FaultGuard() { t_innermost = previous_; }

bool FaultGuard::faulted() const { return faulted_ != 0; }

void FaultGuard::check() const {
  if (faulted()) {
    fail(file_.path(),
         "the file was truncated or rewritten while it was being read (part of it vanished)");
  }
  struct stat st{};
  if (::fstat(file_.fd(), &st) == 0 && static_cast<uint64_t>(st.st_size) < file_.size()) {
    fail(file_.path(), "the file shrank from " + std::to_string(file_.size()) + " to " +
                           std::to_string(st.st_size) + " bytes while it was being read");
  }
}

}  // namespace fastckpt
