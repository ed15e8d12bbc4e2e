// Large CPU outputs backed by transparent huge pages.
//
// A fresh multi-megabyte tensor costs one page fault per 4 KiB page on first touch: for
// Sinkhorn's 4096 x 3000 output that is 12,000 faults, about 20 ms, more than the kernel's
// arithmetic. Advising the kernel to back the allocation with 2 MiB pages (MADV_HUGEPAGE,
// honoured when /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always")
// cuts that to a few dozen faults. PyTorch offers the same for every allocation behind
// THP_MEM_ALLOC_ENABLE=1; here it is applied only to the outputs that need it
// (SSL_OPS_NO_HUGEPAGES=1 turns it off).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sslops {

inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  static const bool off = std::getenv("SSL_OPS_NO_HUGEPAGES") && std::getenv("SSL_OPS_NO_HUGEPAGES")[0] == '1';
  if (!off && t.nbytes() >= 4 * kHuge && last > first)
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return t;
}

}  // namespace sslops
