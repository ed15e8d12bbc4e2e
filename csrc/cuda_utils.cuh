// Small helpers shared by the CUDA kernels of common._C.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cmath>

namespace sslops {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of the row kernels (multiple of 32)

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
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

// Sum over the block; every thread gets the result. `shm` holds >= 32 T.
template <typename T>
__device__ T block_sum(T v, T* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous reduction
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < warps ? shm[lane] : T(0);
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < warps ? shm[lane] : -INFINITY;
  return warp_max(v);
}

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace cuda
}  // namespace sslops
