// Large CPU outputs backed by transparent huge pages, recycled between calls.
//
// A fresh multi-megabyte tensor costs one page fault per 4 KiB page on first touch: for
// Sinkhorn's 4096 x 3000 output that is 12,000 faults, about 20 ms, more than the kernel's
// arithmetic. Two remedies, as a caching allocator would apply them:
//  - the buffer is advised onto 2 MiB pages (MADV_HUGEPAGE, honoured when
//    /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always"): a few dozen faults;
//  - when the tensor is freed, its buffer is kept in a one-slot cache and handed to the next
//    request of the same size (a training loop asks for the same shape every step), so the
//    steady state has no faults at all. At most one idle buffer is kept.
// SSL_OPS_NO_HUGEPAGES=1 turns both off (plain at::empty).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sslops {
namespace detail {

struct BufferSlot {
  std::mutex lock;
  void* ptr = nullptr;
  size_t bytes = 0;
};

inline BufferSlot& slot() {
  static BufferSlot* s = new BufferSlot();  // never destroyed: tensors may be freed during interpreter exit
  return *s;
}

// keeps the most recently freed buffer (the next request most likely has its size)
inline void release(void* ptr, size_t bytes) {
  void* old = nullptr;
  {
    auto& s = slot();
    std::lock_guard<std::mutex> guard(s.lock);
    old = s.ptr;
    s.ptr = ptr, s.bytes = bytes;
  }
  std::free(old);
}

}  // namespace detail

inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  static const bool off = std::getenv("SSL_OPS_NO_HUGEPAGES") && std::getenv("SSL_OPS_NO_HUGEPAGES")[0] == '1';
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
  if (off || bytes < 4 * kHuge) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  {
    auto& s = detail::slot();
    std::lock_guard<std::mutex> guard(s.lock);
    if (s.ptr != nullptr && s.bytes == rounded) ptr = s.ptr, s.ptr = nullptr;
  }
  if (ptr == nullptr) {
    if (posix_memalign(&ptr, kHuge, rounded) != 0) return at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  }
  return at::from_blob(ptr, sizes, [rounded](void* p) { detail::release(p, rounded); }, options);
}

}  // namespace sslops
