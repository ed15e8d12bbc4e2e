// The CPU twin of the CUDA kernels: csrc/kernels/*.cuh compiled against the emulator
// (cuda_emu.h), behind a C interface that tests/test_cuda_emulated*.py load with ctypes. The tests
// build every csrc/emu/harness*.cpp into one library. This file: the emulator's own checks, its
// settings, and Sinkhorn.
#include "harness.h"
#include "../kernels/sinkhorn.cuh"

namespace {

// ---- small kernels that exercise the emulator itself
constexpr unsigned kFull = 0xffffffffu;

__global__ void barrier_skipped_by_some(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffles(int* out) {
  const int lane = threadIdx.x & 31;
  out[4 * threadIdx.x + 0] = __shfl_xor_sync(kFull, lane, 5);
  out[4 * threadIdx.x + 1] = __shfl_down_sync(kFull, lane, 3);
  out[4 * threadIdx.x + 2] = __shfl_up_sync(kFull, lane, 3);
  out[4 * threadIdx.x + 3] = __shfl_sync(kFull, lane, 7);
}

__global__ void empty_kernel() {}

// C[16, 16] = A[16, 16] (row-major) B[16, 16] (column-major), one warp
__global__ void wmma_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}

}  // namespace

extern "C" {

// order: 0 = lowest-numbered runnable thread and block first, 1 = highest first
void emu_set_order(int order) { emu::set_order(order == 0 ? emu::Order::low_first : emu::Order::high_first); }
// dry run: launches check their configuration against the hardware limits and run nothing
void emu_set_dry_run(int on) { emu::set_dry_run(on != 0); }

// dtype: 0 float32, 1 float16 (raw bits), 2 bfloat16 (raw bits), 3 float64
int emu_sinkhorn_init(int dtype, const void* s, const float* colmax, float inv_eps, int64_t B, int64_t K, float* q,
                      double* colsum, double* ws, int64_t max_blocks, int64_t max_shared, char* err, int err_len) {
  using namespace sslops;
  return guarded(err, err_len, [&] {
    const size_t shm = static_cast<size_t>(max_shared);
    switch (dtype) {
      case 0: sinkhorn::init(static_cast<const float*>(s), colmax, inv_eps, B, K, q, colsum, ws, max_blocks, shm, nullptr); break;
      case 1: sinkhorn::init(static_cast<const __half*>(s), colmax, inv_eps, B, K, q, colsum, ws, max_blocks, shm, nullptr); break;
      case 2: sinkhorn::init(static_cast<const __nv_bfloat16*>(s), colmax, inv_eps, B, K, q, colsum, ws, max_blocks, shm, nullptr); break;
      case 3: sinkhorn::init(static_cast<const double*>(s), colmax, inv_eps, B, K, q, colsum, ws, max_blocks, shm, nullptr); break;
      default: throw emu::Error("unknown dtype code");
    }
  });
}

int emu_sinkhorn_step(const float* q, const double* u, int64_t B, int64_t K, double* colsum, double* ws,
                      int64_t max_blocks, int64_t max_shared, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    sslops::sinkhorn::step(q, u, B, K, colsum, ws, max_blocks, static_cast<size_t>(max_shared), nullptr);
  });
}

int emu_sinkhorn_finish(float* q, const double* u, int64_t B, int64_t K, int64_t max_blocks, int64_t max_shared,
                        char* err, int err_len) {
  return guarded(err, err_len, [&] {
    sslops::sinkhorn::finish(q, u, B, K, max_blocks, static_cast<size_t>(max_shared), nullptr);
  });
}

// emulator self-checks: `what` 0 = a barrier skipped by half the block (must fail), 1 = shuffles
// into out[128] (one warp), 2 = a grid of 70,000 blocks in y (must fail), 3 = wmma bf16 into out[256]
int emu_selftest(int what, const void* a, const void* b, void* out, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    switch (what) {
      case 0: SSL_LAUNCH(dim3(1), dim3(32), 0, nullptr, barrier_skipped_by_some)(static_cast<int*>(out)); break;
      case 1: SSL_LAUNCH(dim3(1), dim3(32), 0, nullptr, shuffles)(static_cast<int*>(out)); break;
      case 2: SSL_LAUNCH(dim3(1, 70000), dim3(32), 0, nullptr, empty_kernel)(); break;
      case 3:
        SSL_LAUNCH(dim3(1), dim3(32), 0, nullptr, wmma_bf16)(static_cast<const __nv_bfloat16*>(a),
                                                            static_cast<const __nv_bfloat16*>(b), static_cast<float*>(out));
        break;
      default: throw emu::Error("unknown self-test");
    }
  });
}

int64_t emu_sinkhorn_workspace(int64_t B, int64_t K, int64_t max_blocks, int64_t max_shared) {
  return sslops::sinkhorn::workspace_doubles(B, K, max_blocks, static_cast<size_t>(max_shared));
}

}  // extern "C"
