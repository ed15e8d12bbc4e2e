// The ATen side of the CUDA kernels (csrc/*_cuda.cu): headers and the launch check. The kernels
// themselves, and their block reductions, are in csrc/kernels/.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace sslops {
namespace cuda {

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

}  // namespace cuda
}  // namespace sslops
