// A CPU emulator of the CUDA execution model, for testing this project's kernels without a GPU.
//
// The kernel sources in csrc/kernels/ compile unchanged with nvcc and, through this header,
// with the host C++ compiler. Every GPU thread of a block is a fiber (ucontext) with its own
// stack; the fibers of one block run cooperatively on the calling thread, one block after the
// other. What a kernel can get wrong on a GPU fails here too:
//
//   - __syncthreads() is a real barrier. All live threads of the block must reach the same one
//     (same source line); a thread that has exited while others wait, or threads waiting at
//     different barriers, is reported as divergence.
//   - warp collectives (__shfl_*_sync, __syncwarp, __ballot_sync, wmma::*) wait for all 32
//     lanes of the warp, at the same call site, with the full mask of lanes that exist.
//   - the scheduler is adversarial: it always resumes the lowest-numbered runnable thread
//     (Order::low_first) or the highest (Order::high_first), so one warp runs as far ahead of
//     the others as the barriers allow, and blocks run in ascending or descending order. A
//     missing __syncthreads() then reads data that another warp has not written yet, or has
//     already overwritten.
//   - dynamic shared memory (SSL_DYN_SHARED in compat.cuh) is poisoned with 0xff bytes (NaN for
//     floats) before every block, so reading it before writing it shows up in the result.
//   - launch configurations are checked against the hardware limits (1024 threads per block,
//     grid.y and grid.z <= 65535, dynamic shared memory <= 48 KiB without opt-in and <= 227 KiB).
//   - wmma fragments: each lane holds the whole tile (element (r, c) at x[r * cols + c]); loads,
//     stores and mma are warp collectives whose pointer and stride must agree across lanes (and
//     be 256-bit aligned, the stride a multiple of 16 bytes), and a
//     store checks that every lane holds the same fragment (element-wise code that depends on the
//     lane would be meaningless on a GPU, where the layout is opaque).
//
// Errors are thrown as emu::Error from launch(). Only what this project's kernels use is
// emulated; anything else fails to compile.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- CUDA spellings
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // static shared arrays: one block runs at a time (not poisoned; use SSL_DYN_SHARED)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef struct CUstream_st* cudaStream_t;

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Order { low_first, high_first };

namespace detail {

enum class State { runnable, at_block_barrier, at_warp_barrier, done };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0;
  State state = State::runnable;
  const char* site_file = nullptr;
  int site_line = 0;
};

struct WarpExchange {
  unsigned char slot[32][16];  // one value per lane (shuffles, pointers of wmma calls)
};

struct Runtime {
  // configuration
  Order order = Order::low_first;
  bool dry_run = false;
  size_t stack_bytes = 256 * 1024;
  size_t max_dynamic_shared = 48 * 1024;  // raised per launch by allow_shared (cudaFuncSetAttribute)
  // the running block
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  std::vector<unsigned char> dyn_shared_store;  // over-allocated: dyn_shared is 128-byte aligned
  unsigned char* dyn_shared = nullptr;
  size_t dyn_shared_bytes = 0;
  int current = -1;
  ucontext_t scheduler;
  std::function<void()> body;
  std::string error;  // set by a fiber; the scheduler throws it
  // stacks, reused between launches
  std::vector<char*> stacks;

  ~Runtime() {
    for (char* s : stacks) munmap(s, stack_bytes);
  }
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

inline Fiber& self() {
  Runtime& r = rt();
  if (r.current < 0) throw Error("a device function was called outside a kernel launch");
  return r.fibers[r.current];
}

inline std::string where(const Fiber& f) {
  const Runtime& r = rt();
  return "block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
         std::to_string(r.block_idx.z) + ") thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
         "," + std::to_string(f.tid.z) + ")";
}

// Called on a fiber: record an error and hand control back for good.
[[noreturn]] inline void fail(const std::string& msg) {
  Runtime& r = rt();
  Fiber& f = self();
  if (r.error.empty()) r.error = msg + " [" + where(f) + "]";
  f.state = State::done;
  swapcontext(&f.ctx, &r.scheduler);
  std::abort();  // never resumed
}

inline void yield_to_scheduler() {
  Runtime& r = rt();
  Fiber& f = self();
  swapcontext(&f.ctx, &r.scheduler);
}

inline void fiber_entry() {
  Runtime& r = rt();
  r.body();
  r.fibers[r.current].state = State::done;
  // returning resumes uc_link, the scheduler
}

inline int warp_size_of(int warp) {
  const int n = static_cast<int>(rt().fibers.size());
  return std::min(32, n - warp * 32);
}

// Releases a barrier whose participants have all arrived; reports divergence.
// Returns true if some fiber became runnable.
inline bool release_barriers() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.fibers.size());
  bool released = false;
  // warp barriers: all live lanes of a warp waiting at the same site
  for (int w = 0; w * 32 < n; ++w) {
    const int lo = w * 32, hi = std::min(n, lo + 32);
    int waiting = 0, done = 0;
    const Fiber* first = nullptr;
    for (int i = lo; i < hi; ++i) {
      const Fiber& f = r.fibers[i];
      if (f.state == State::at_warp_barrier) {
        ++waiting;
        if (!first) first = &f;
      } else if (f.state == State::done) {
        ++done;
      }
    }
    if (waiting == 0) continue;
    bool others_elsewhere = waiting + done < hi - lo;
    if (others_elsewhere) continue;  // some lanes still running or at a block barrier: decided below
    if (done > 0)
      throw Error("warp collective at " + std::string(first->site_file) + ":" + std::to_string(first->site_line) +
                  " waits for lanes that have exited [" + where(*first) + "]");
    for (int i = lo; i < hi; ++i) {
      const Fiber& f = r.fibers[i];
      if (f.site_line != first->site_line || std::strcmp(f.site_file, first->site_file) != 0)
        throw Error("divergent warp: lanes wait at " + std::string(first->site_file) + ":" +
                    std::to_string(first->site_line) + " and " + f.site_file + ":" + std::to_string(f.site_line) +
                    " [" + where(f) + "]");
    }
    for (int i = lo; i < hi; ++i) r.fibers[i].state = State::runnable;
    released = true;
  }
  if (released) return true;
  // block barrier: every live thread waiting at one __syncthreads
  int waiting = 0, done = 0, running = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::at_block_barrier) {
      ++waiting;
      if (!first) first = &f;
    } else if (f.state == State::done) {
      ++done;
    } else if (f.state == State::runnable) {
      ++running;
    }
  }
  if (running > 0 || waiting == 0) return false;
  if (waiting + done < n) return false;  // some at a warp barrier: deadlock, reported by the caller
  if (done > 0)
    throw Error("__syncthreads() at " + std::string(first->site_file) + ":" + std::to_string(first->site_line) +
                " is not reached by threads that have exited (divergent barrier) [" + where(*first) + "]");
  for (const Fiber& f : r.fibers)
    if (f.site_line != first->site_line || std::strcmp(f.site_file, first->site_file) != 0)
      throw Error("divergent __syncthreads(): threads wait at " + std::string(first->site_file) + ":" +
                  std::to_string(first->site_line) + " and " + f.site_file + ":" + std::to_string(f.site_line) +
                  " [" + where(f) + "]");
  for (Fiber& f : r.fibers) f.state = State::runnable;
  return true;
}

inline int next_runnable() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.fibers.size());
  if (r.order == Order::low_first) {
    for (int i = 0; i < n; ++i)
      if (r.fibers[i].state == State::runnable) return i;
  } else {
    for (int i = n - 1; i >= 0; --i)
      if (r.fibers[i].state == State::runnable) return i;
  }
  return -1;
}

inline void run_block() {
  Runtime& r = rt();
  const int n = static_cast<int>(r.block.x * r.block.y * r.block.z);
  r.fibers.assign(n, Fiber());
  r.warps.assign((n + 31) / 32, WarpExchange());
  while (static_cast<int>(r.stacks.size()) < n) {
    void* p = mmap(nullptr, r.stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("emulator: cannot map a fiber stack");
    r.stacks.push_back(static_cast<char*>(p));
  }
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.tid = {static_cast<unsigned>(i % r.block.x), static_cast<unsigned>((i / r.block.x) % r.block.y),
             static_cast<unsigned>(i / (r.block.x * r.block.y))};
    f.stack = r.stacks[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = r.stack_bytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::memset(r.dyn_shared, 0xff, r.dyn_shared_bytes);
  for (;;) {
    int i = next_runnable();
    if (i < 0) {
      if (!r.error.empty()) throw Error(r.error);
      if (release_barriers()) continue;
      bool all_done = true;
      for (const Fiber& f : r.fibers) all_done = all_done && f.state == State::done;
      if (all_done) break;
      throw Error("deadlock: threads wait at a warp collective while others wait at __syncthreads() "
                  "(divergent control flow)");
    }
    r.current = i;
    swapcontext(&r.scheduler, &r.fibers[i].ctx);
    r.current = -1;
    if (!r.error.empty()) throw Error(r.error);
    // a completed barrier releases its threads at once, so the scheduler's favourite warp runs ahead
    while (release_barriers()) {
    }
  }
}

}  // namespace detail

// ---------------------------------------------------------------- configuration (for tests)
inline void set_order(Order o) { detail::rt().order = o; }
inline void set_dry_run(bool on) { detail::rt().dry_run = on; }  // check launch configurations only

inline unsigned char* dynamic_shared() { return detail::rt().dyn_shared; }

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
inline void allow_shared(size_t bytes) {
  if (bytes > 227 * 1024) throw Error("emulator: more than 227 KiB of dynamic shared memory per block requested");
  detail::rt().max_dynamic_shared = std::max<size_t>(48 * 1024, bytes);
}

// Runs kernel(args...) on grid x block threads. Throws emu::Error on a bad configuration or a
// kernel fault.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dyn_shared, A&&... args) {
  detail::Runtime& r = detail::rt();
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    throw Error("invalid configuration argument: " + std::to_string(threads) + " threads per block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    throw Error("invalid configuration argument: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                ", " + std::to_string(grid.z) + ") exceeds the limits (2^31-1, 65535, 65535)");
  if (dyn_shared > r.max_dynamic_shared)
    throw Error("too many resources requested for launch: " + std::to_string(dyn_shared) +
                " bytes of dynamic shared memory (limit " + std::to_string(r.max_dynamic_shared) + ")");
  r.max_dynamic_shared = 48 * 1024;  // the opt-in applies to this launch
  if (r.dry_run) return;
  std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
  r.body = [&]() { std::apply(kernel, params); };
  r.grid = grid;
  r.block = block;
  r.dyn_shared_store.assign(dyn_shared + 128, 0xff);
  const uintptr_t base = reinterpret_cast<uintptr_t>(r.dyn_shared_store.data());
  r.dyn_shared = r.dyn_shared_store.data() + ((128 - base % 128) % 128);
  r.dyn_shared_bytes = dyn_shared;
  r.error.clear();
  const unsigned long long nblocks = 1ull * grid.x * grid.y * grid.z;
  for (unsigned long long j = 0; j < nblocks; ++j) {
    const unsigned long long b = r.order == Order::low_first ? j : nblocks - 1 - j;
    r.block_idx = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                   static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
    detail::run_block();
  }
  r.body = nullptr;
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared;
  template <typename... A>
  void operator()(A&&... args) const {
    launch(kernel, grid, block, shared, std::forward<A>(args)...);
  }
};
template <typename... P>
Launcher<P...> launcher(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, cudaStream_t /*stream*/) {
  return {kernel, grid, block, shared};
}

// ---------------------------------------------------------------- built-in variables
namespace detail {
inline uint3 thread_idx() { return self().tid; }
inline uint3 block_idx() {
  const dim3& b = rt().block_idx;
  return {b.x, b.y, b.z};
}
inline uint3 block_dim() {
  const dim3& b = rt().block;
  return {b.x, b.y, b.z};
}
inline uint3 grid_dim() {
  const dim3& g = rt().grid;
  return {g.x, g.y, g.z};
}
}  // namespace detail

// ---------------------------------------------------------------- barriers and warp collectives
inline void syncthreads(const char* file, int line) {
  detail::Fiber& f = detail::self();
  f.site_file = file;
  f.site_line = line;
  f.state = detail::State::at_block_barrier;
  detail::yield_to_scheduler();
}

namespace detail {
inline void warp_barrier(const char* file, int line) {
  Fiber& f = self();
  f.site_file = file;
  f.site_line = line;
  f.state = State::at_warp_barrier;
  yield_to_scheduler();
}

inline unsigned full_mask_of_my_warp() {
  const int lanes = warp_size_of(self().linear / 32);
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}

inline void check_mask(unsigned mask, const char* what) {
  if (mask != full_mask_of_my_warp())
    fail(std::string(what) + ": only the full mask of the warp's lanes is supported (got 0x" +
         [&] {
           char b[16];
           std::snprintf(b, sizeof b, "%08x", mask);
           return std::string(b);
         }() +
         ")");
}

// every lane posts `v`; returns the value posted by lane src(lane)
template <typename T, typename Src>
T exchange(T v, Src src, const char* file, int line) {
  static_assert(sizeof(T) <= 16, "warp exchange of a value larger than 16 bytes");
  Runtime& r = rt();
  Fiber& f = self();
  const int warp = f.linear / 32, lane = f.linear % 32, lanes = warp_size_of(warp);
  std::memcpy(r.warps[warp].slot[lane], &v, sizeof(T));
  warp_barrier(file, line);
  int s = src(lane);
  if (s < 0 || s >= lanes) s = lane;
  T out;
  std::memcpy(&out, r.warps[warp].slot[s], sizeof(T));
  warp_barrier(file, line);  // every lane has read before a slot is reused
  return out;
}
}  // namespace detail

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width, const char* file, int line) {
  detail::check_mask(mask, "__shfl_xor_sync");
  return detail::exchange(v, [&](int lane) { return ((lane ^ lane_mask) / width == lane / width) ? (lane ^ lane_mask) : lane; },
                          file, line);
}
template <typename T>
T shfl_down(unsigned mask, T v, unsigned delta, int width, const char* file, int line) {
  detail::check_mask(mask, "__shfl_down_sync");
  return detail::exchange(
      v, [&](int lane) { return (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane; },
      file, line);
}
template <typename T>
T shfl_up(unsigned mask, T v, unsigned delta, int width, const char* file, int line) {
  detail::check_mask(mask, "__shfl_up_sync");
  return detail::exchange(
      v, [&](int lane) { return (lane % width) >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane; },
      file, line);
}
template <typename T>
T shfl_idx(unsigned mask, T v, int src, int width, const char* file, int line) {
  detail::check_mask(mask, "__shfl_sync");
  return detail::exchange(v, [&](int lane) { return (lane / width) * width + (src % width); }, file, line);
}
inline void syncwarp(unsigned mask, const char* file, int line) {
  detail::check_mask(mask, "__syncwarp");
  detail::warp_barrier(file, line);
}
inline unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  detail::check_mask(mask, "__ballot_sync");
  detail::Runtime& r = detail::rt();
  detail::Fiber& f = detail::self();
  const int warp = f.linear / 32, lane = f.linear % 32, lanes = detail::warp_size_of(warp);
  const unsigned char p = pred ? 1 : 0;
  std::memcpy(r.warps[warp].slot[lane], &p, 1);
  detail::warp_barrier(file, line);
  unsigned out = 0;
  for (int l = 0; l < lanes; ++l) out |= static_cast<unsigned>(r.warps[warp].slot[l][0]) << l;
  detail::warp_barrier(file, line);
  return out;
}

// all lanes pass the same value (a wmma pointer, a stride): else the call is not warp-uniform
template <typename T>
void require_uniform(T v, const char* what, const char* file, int line) {
  T first = detail::exchange(v, [](int) { return 0; }, file, line);
  if (std::memcmp(&first, &v, sizeof(T)) != 0) detail::fail(std::string(what) + " is not the same on every lane");
}

}  // namespace emu

#define threadIdx (::emu::detail::thread_idx())
#define blockIdx (::emu::detail::block_idx())
#define blockDim (::emu::detail::block_dim())
#define gridDim (::emu::detail::grid_dim())
#define warpSize 32

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp((0xffffffffu __VA_OPT__(* 0u + (__VA_ARGS__))), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  ::emu::shfl_xor(mask, v, lane_mask, EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, delta, ...) ::emu::shfl_down(mask, v, delta, EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, delta, ...) ::emu::shfl_up(mask, v, delta, EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) ::emu::shfl_idx(mask, v, src, EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::emu::ballot(mask, pred, __FILE__, __LINE__)
#define EMU_WIDTH(...) (32 __VA_OPT__(* 0 + (__VA_ARGS__)))
#define __threadfence() ((void)0)

// ---------------------------------------------------------------- atomics (fibers never preempt each other)
template <typename T>
inline T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}

// ---------------------------------------------------------------- math intrinsics
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
using std::isfinite;
using std::isnan;

// ---------------------------------------------------------------- 16-bit floats (round to nearest even)
namespace emu {
inline uint16_t float_to_upper16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float upper16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {                                               // subnormal half (or 0)
    float a;
    std::memcpy(&a, &ax, 4);
    const float scaled = a * 16777216.0f;  // 2^24: one half ulp of subnormals is 2^-24
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)));
  }
  const uint32_t mant_odd = (ax >> 13) & 1u;
  ax += 0xfffu + mant_odd;
  return static_cast<uint16_t>(sign | ((ax - 0x38000000u) >> 13));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  uint32_t u = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace emu

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float f) : bits(emu::float_to_half_bits(f)) {}
  operator float() const { return emu::half_bits_to_float(bits); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : bits(emu::float_to_upper16_rne(f)) {}
  operator float() const { return emu::upper16_to_float(bits); }
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// ---------------------------------------------------------------- warp matrix functions (nvcuda::wmma)
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// tf32: 10 explicit mantissa bits, rounded to nearest with ties away from zero (cvt.rna.tf32.f32)
inline float __float_to_tf32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  using storage_type = typename std::conditional<std::is_same<T, precision::tf32>::value, float, T>::type;
  static constexpr int num_elements = rows * cols;  // the whole tile on every lane (see the header comment)
  storage_type x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<typename fragment<Use, M, N, K, T, L>::storage_type>(v);
}

namespace detail {
// mptr 256-bit aligned, ldm a multiple of 16 bytes (8 for 16-bit elements, 4 for 32-bit)
template <typename P>
void check_layout(const P* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::emu::detail::fail(std::string(what) + ": the pointer is not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0) ::emu::detail::fail(std::string(what) + ": ldm is not a multiple of 16 bytes");
}

template <typename Frag, typename P>
void load(Frag& f, const P* p, unsigned ldm, bool col_major_mem, const char* file, int line) {
  ::emu::require_uniform(p, "wmma::load_matrix_sync pointer", file, line);
  ::emu::require_uniform(ldm, "wmma::load_matrix_sync ldm", file, line);
  check_layout(p, ldm, "wmma::load_matrix_sync");
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c)
      f.x[r * Frag::cols + c] =
          static_cast<typename Frag::storage_type>(col_major_mem ? p[c * static_cast<size_t>(ldm) + r] : p[r * static_cast<size_t>(ldm) + c]);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename P>
void load_matrix_sync_at(fragment<Use, M, N, K, T, row_major>& f, const P* p, unsigned ldm, const char* file, int line) {
  detail::load(f, p, ldm, false, file, line);
}
template <typename Use, int M, int N, int K, typename T, typename P>
void load_matrix_sync_at(fragment<Use, M, N, K, T, col_major>& f, const P* p, unsigned ldm, const char* file, int line) {
  detail::load(f, p, ldm, true, file, line);
}
template <int M, int N, int K, typename T, typename P>
void load_matrix_sync_at(fragment<accumulator, M, N, K, T, void>& f, const P* p, unsigned ldm, layout_t layout,
                         const char* file, int line) {
  detail::load(f, p, ldm, layout == mem_col_major, file, line);
}

template <int M, int N, int K, typename T, typename P>
void store_matrix_sync_at(P* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t layout,
                          const char* file, int line) {
  using Frag = fragment<accumulator, M, N, K, T, void>;
  ::emu::require_uniform(p, "wmma::store_matrix_sync pointer", file, line);
  ::emu::require_uniform(ldm, "wmma::store_matrix_sync ldm", file, line);
  detail::check_layout(p, ldm, "wmma::store_matrix_sync");
  // every lane must hold the same tile as lane 0 (the fibers share one address space)
  const Frag* f0 = ::emu::detail::exchange(&f, [](int) { return 0; }, file, line);
  if (std::memcmp(f0->x, f.x, sizeof(f.x)) != 0)
    ::emu::detail::fail("wmma::store_matrix_sync: the fragment differs between lanes (lane-dependent element-wise code)");
  ::emu::detail::warp_barrier(file, line);  // lane 0's fragment is read by all before anyone goes on
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) {
      const size_t at = layout == mem_col_major ? c * static_cast<size_t>(ldm) + r : r * static_cast<size_t>(ldm) + c;
      p[at] = static_cast<P>(f.x[r * Frag::cols + c]);
    }
  ::emu::detail::warp_barrier(file, line);  // stores complete before any lane goes on
}

// d = a b + c, products exact, sums in fp32 (tf32 operands: the low 13 mantissa bits ignored)
template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB, typename TC>
void mma_sync_at(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                 const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c,
                 const char* file, int line) {
  ::emu::detail::warp_barrier(file, line);
  auto in = [](auto v, bool tf32) {
    float f = static_cast<float>(v);
    if (tf32) {
      uint32_t u;
      std::memcpy(&u, &f, 4);
      u &= 0xffffe000u;
      std::memcpy(&f, &u, 4);
    }
    return f;
  };
  constexpr bool ta = std::is_same<TA, precision::tf32>::value, tb = std::is_same<TB, precision::tf32>::value;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) acc += in(a.x[i * K + k], ta) * in(b.x[k * N + j], tb);
      out[i * N + j] = acc;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
  ::emu::detail::warp_barrier(file, line);
}

}  // namespace wmma
}  // namespace nvcuda

#define load_matrix_sync(...) load_matrix_sync_at(__VA_ARGS__, __FILE__, __LINE__)
#define store_matrix_sync(...) store_matrix_sync_at(__VA_ARGS__, __FILE__, __LINE__)
#define mma_sync(...) mma_sync_at(__VA_ARGS__, __FILE__, __LINE__)
