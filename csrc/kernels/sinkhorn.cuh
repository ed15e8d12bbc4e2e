// Sinkhorn-Knopp (SwAV) kernels: the algorithm of csrc/sinkhorn.cpp (see there) on a GPU, one
// pass over Q per call.
//
// A block owns whole rows (grid-stride over rows, so any number of rows fits one grid.x) and
// the column partial sums of those rows, each column owned by one thread (column k by thread
// k mod blockDim.x): no atomics, and the partials are added up afterwards in a fixed order
// (reduce_partials_kernel), so the result does not depend on scheduling. The partials and the
// scaling vector u live in shared memory when 2 K doubles fit (K <= ~14,000 on an H100),
// otherwise in global memory (the same code on another pointer).
//
//   init:   Q'[b,k] = exp(t - max_k t), t = (s[b,k] - colmax[k]) * (1/eps); w_b = exp(max t);
//           column sums sum_b w_b Q'[b,k]
//   step:   v_b = 1 / sum_k Q'[b,k] u_k; column sums sum_b Q'[b,k] v_b
//   finish: Q'[b,k] <- Q'[b,k] u_k / sum_k' Q'[b,k'] u_k'  (in place)
//
// Each row is read from global memory once per call; the row's second touch (the row max
// before the exp, the dot product before the column update) comes from L1/L2.
#pragma once
#include "compat.cuh"

namespace sslops {
namespace sinkhorn {

constexpr int kThreads = 256;

struct Plan {
  int64_t blocks;     // row blocks (0 when B == 0)
  size_t shared;      // dynamic shared memory per block, bytes
  bool in_shared;     // partials and u in shared memory (else in global memory)
};

// blocks: at most max_blocks, at least 16 rows each; shared memory: [partial K][u K][red 32] doubles
inline Plan plan(int64_t B, int64_t K, int64_t max_blocks, size_t max_shared) {
  Plan p;
  const int64_t by_rows = dev::ceil_div(B, 16);
  p.blocks = B == 0 ? 0 : (by_rows < max_blocks ? by_rows : max_blocks);
  const size_t want = (2 * static_cast<size_t>(K) + 32) * sizeof(double);
  p.in_shared = want <= max_shared;
  p.shared = p.in_shared ? want : 32 * sizeof(double);
  return p;
}

// the doubles of global workspace the launchers need: the partial column sums [blocks, K]
inline int64_t workspace_doubles(int64_t B, int64_t K, int64_t max_blocks, size_t max_shared) {
  const Plan p = plan(B, K, max_blocks, max_shared);
  return p.blocks * K;
}

// acc[k] (this block's partial) and uu[k] (u) for k owned by this thread
struct Slots {
  double* acc;
  const double* u;
  double* red;
};

__device__ __forceinline__ Slots slots(unsigned char* smem, bool in_shared, double* partial, const double* u,
                                       int64_t K, bool load_u) {
  double* sm = reinterpret_cast<double*>(smem);
  Slots s;
  if (in_shared) {
    s.acc = sm;
    double* su = sm + K;
    if (load_u)
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) su[k] = u[k];
    s.u = su;
    s.red = sm + 2 * K;
  } else {
    s.acc = partial + static_cast<int64_t>(blockIdx.x) * K;
    s.u = u;
    s.red = sm;
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) s.acc[k] = 0.0;
  __syncthreads();  // u is in place before any thread reads another thread's column
  return s;
}

// this block's partials to global memory (when they were in shared memory)
__device__ __forceinline__ void store_partials(const Slots& s, bool in_shared, double* partial, int64_t K) {
  if (!in_shared) return;
  double* out = partial + static_cast<int64_t>(blockIdx.x) * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) out[k] = s.acc[k];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) init_kernel(const T* __restrict__ s, const float* __restrict__ colmax,
                                                        float inv_eps, int64_t B, int64_t K, bool in_shared,
                                                        float* __restrict__ q, double* __restrict__ partial) {
  SSL_DYN_SHARED(smem);
  const Slots sl = slots(smem, in_shared, partial, nullptr, K, false);
  float* redf = reinterpret_cast<float*>(sl.red);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T* sr = s + b * K;
    float* qr = q + b * K;
    float mx = -INFINITY;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      mx = fmaxf(mx, (dev::to_float(sr[k]) - colmax[k]) * inv_eps);
    mx = dev::block_max(mx, redf);
    if (!isfinite(mx)) mx = 0.f;
    const double w = exp(static_cast<double>(mx));
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float e = expf((dev::to_float(sr[k]) - colmax[k]) * inv_eps - mx);
      qr[k] = e;
      sl.acc[k] += w * static_cast<double>(e);
    }
  }
  store_partials(sl, in_shared, partial, K);
}

__global__ void __launch_bounds__(kThreads) step_kernel(const float* __restrict__ q, const double* __restrict__ u,
                                                        int64_t B, int64_t K, bool in_shared,
                                                        double* __restrict__ partial) {
  SSL_DYN_SHARED(smem);
  const Slots sl = slots(smem, in_shared, partial, u, K, true);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const float* qr = q + b * K;
    double dot = 0.0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dot += static_cast<double>(qr[k]) * sl.u[k];
    const double v = 1.0 / dev::block_sum(dot, sl.red);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) sl.acc[k] += static_cast<double>(qr[k]) * v;
  }
  store_partials(sl, in_shared, partial, K);
}

__global__ void __launch_bounds__(kThreads) finish_kernel(float* __restrict__ q, const double* __restrict__ u,
                                                          int64_t B, int64_t K, bool in_shared) {
  SSL_DYN_SHARED(smem);
  double* sm = reinterpret_cast<double*>(smem);
  const double* uu = u;
  double* red = sm;
  if (in_shared) {
    double* su = sm;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) su[k] = u[k];
    uu = su;
    red = sm + 2 * K;
    __syncthreads();
  }
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    float* qr = q + b * K;
    double dot = 0.0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dot += static_cast<double>(qr[k]) * uu[k];
    const double inv = 1.0 / dev::block_sum(dot, red);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = static_cast<float>(qr[k] * uu[k] * inv);
  }
}

// out[k] = sum over blocks g (in order) of partial[g, k]
__global__ void reduce_partials_kernel(const double* __restrict__ partial, int64_t G, int64_t K,
                                       double* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double acc = 0.0;
  for (int64_t g = 0; g < G; ++g) acc += partial[g * K + k];
  out[k] = acc;
}

inline void reduce_partials(const double* partial, int64_t G, int64_t K, double* out, cudaStream_t stream) {
  const int64_t blocks = dev::ceil_div(K, kThreads);
  SSL_LAUNCH(dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, reduce_partials_kernel)(partial, G, K, out);
}

// ---- launchers (raw pointers; the caller allocates: q [B, K] fp32, colsum [K] double, and
// workspace_doubles(...) doubles of workspace)
template <typename T>
void init(const T* s, const float* colmax, float inv_eps, int64_t B, int64_t K, float* q, double* colsum,
          double* workspace, int64_t max_blocks, size_t max_shared, cudaStream_t stream) {
  const Plan p = plan(B, K, max_blocks, max_shared);
  if (p.blocks > 0) {
    ssl_allow_shared(init_kernel<T>, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads), p.shared, stream, init_kernel<T>)(
        s, colmax, inv_eps, B, K, p.in_shared, q, workspace);
  }
  reduce_partials(workspace, p.blocks, K, colsum, stream);
}

inline void step(const float* q, const double* u, int64_t B, int64_t K, double* colsum, double* workspace,
                 int64_t max_blocks, size_t max_shared, cudaStream_t stream) {
  const Plan p = plan(B, K, max_blocks, max_shared);
  if (p.blocks > 0) {
    ssl_allow_shared(step_kernel, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads), p.shared, stream, step_kernel)(
        q, u, B, K, p.in_shared, workspace);
  }
  reduce_partials(workspace, p.blocks, K, colsum, stream);
}

inline void finish(float* q, const double* u, int64_t B, int64_t K, int64_t max_blocks, size_t max_shared,
                   cudaStream_t stream) {
  const Plan p = plan(B, K, max_blocks, max_shared);
  if (p.blocks == 0) return;
  ssl_allow_shared(finish_kernel, p.shared);
  SSL_LAUNCH(dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads), p.shared, stream, finish_kernel)(
      q, u, B, K, p.in_shared);
}

}  // namespace sinkhorn
}  // namespace sslops
