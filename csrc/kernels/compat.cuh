// What the kernels in this folder need from CUDA, spelled so that the same source compiles with
// nvcc (the real kernels, csrc/*_cuda.cu) and with the host C++ compiler against the CPU emulator
// of csrc/emu/cuda_emu.h (their CPU twin, built and checked by tests/test_cuda_emulated.py).
//
//   SSL_DYN_SHARED(name)                    the block's dynamic shared memory, as unsigned char*
//   SSL_LAUNCH(grid, block, shared, stream, kernel)(args...)
//   ssl_allow_shared(kernel, bytes)         opt in to more than 48 KiB of dynamic shared memory
//   dev::load16(p) / dev::store16(p, v)     16 bytes as one access (the emulator checks the alignment)
//
// Files here hold device code and raw-pointer launchers only (no ATen, no cuBLAS).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define SSL_DYN_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define SSL_LAUNCH(grid, block, shared, stream, ...) __VA_ARGS__<<<grid, block, shared, stream>>>
template <typename Kernel>
inline void ssl_allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}
#else
#include "../emu/cuda_emu.h"
#define SSL_DYN_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#define SSL_LAUNCH(grid, block, shared, stream, ...) ::emu::launcher(__VA_ARGS__, grid, block, shared, stream)
template <typename Kernel>
inline void ssl_allow_shared(Kernel, size_t bytes) {
  ::emu::allow_shared(bytes);
}
#endif

namespace sslops {
namespace dev {

// 16 bytes moved as one access (LDG.128 / STS.128); the address must be 16-byte aligned
struct alignas(16) Bytes16 {
  uint32_t w[4];
};
#if defined(__CUDACC__)
__device__ __forceinline__ Bytes16 load16(const void* p) { return *static_cast<const Bytes16*>(p); }
__device__ __forceinline__ void store16(void* p, const Bytes16& v) { *static_cast<Bytes16*>(p) = v; }
#else
inline void check16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    ::emu::detail::fail("a 16-byte access at an address not 16-byte aligned");
}
inline Bytes16 load16(const void* p) {
  check16(p);
  Bytes16 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void store16(void* p, const Bytes16& v) {
  check16(p);
  std::memcpy(p, &v, 16);
}
#endif

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// float -> T, rounded to nearest (no implicit conversions under __CUDA_NO_HALF_CONVERSIONS__)
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the result. `red` holds
// >= 32 T and may be reused right after: the first barrier orders this reduction after the last.
template <typename T>
__device__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : T(0);
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : -INFINITY;
  return warp_max(v);
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace dev
}  // namespace sslops
