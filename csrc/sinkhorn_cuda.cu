// Sinkhorn-Knopp (SwAV) on CUDA: same algorithm as sinkhorn.cpp (see there). Q' is
// written once (fp32); each iteration reads it twice (row sums -> v, column sums -> u),
// never rewrites it; the last pass writes the normalised result in place.
#include "cuda_utils.cuh"
#include "ops.h"

namespace sslops {
namespace {
using namespace sslops::cuda;

constexpr int kColRows = 64;  // rows summed per thread before one atomicAdd per column

// one block per row b: Q'[b,k] = exp(t - max_k t), t = s[b,k]/eps - colmax[k]/eps; w[b] = exp(max t)
template <typename T>
__global__ void init_rows_kernel(const T* __restrict__ s, const float* __restrict__ colmax, float eps, int64_t K,
                                 float* __restrict__ q, double* __restrict__ w) {
  __shared__ float shm[32];
  const int64_t b = blockIdx.x;
  const T* sr = s + b * K;
  float* qr = q + b * K;
  float mx = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) mx = fmaxf(mx, to_float(sr[k]) / eps - colmax[k] / eps);
  mx = block_max(mx, shm);
  if (!isfinite(mx)) mx = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = expf((to_float(sr[k]) / eps - colmax[k] / eps) - mx);
  if (threadIdx.x == 0) w[b] = exp(static_cast<double>(mx));
}

// out[k] += sum_b q[b,k] * w[b] over this block's kColRows rows (coalesced over k)
__global__ void col_sum_kernel(const float* __restrict__ q, const double* __restrict__ w, int64_t B, int64_t K,
                               double* __restrict__ out) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kColRows;
  const int64_t b1 = b0 + kColRows < B ? b0 + kColRows : B;
  double acc = 0;
  for (int64_t b = b0; b < b1; ++b) acc += static_cast<double>(q[b * K + k]) * w[b];
  atomicAdd(out + k, acc);
}

// one block per row: v[b] = 1 / sum_k q[b,k] u[k]; with `finish`, q[b,:] <- q[b,:] u v instead
__global__ void row_kernel(float* __restrict__ q, const double* __restrict__ u, int64_t K, double* __restrict__ v,
                           bool finish) {
  __shared__ double shm[32];
  const int64_t b = blockIdx.x;
  float* qr = q + b * K;
  double acc = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) acc += static_cast<double>(qr[k]) * u[k];
  const double inv = 1.0 / block_sum(acc, shm);
  if (!finish) {
    if (threadIdx.x == 0) v[b] = inv;
    return;
  }
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) qr[k] = static_cast<float>(qr[k] * u[k] * inv);
}

at::Tensor col_sums(const at::Tensor& q, const at::Tensor& w) {
  const int64_t B = q.size(0), K = q.size(1);
  auto out = at::zeros({K}, q.options().dtype(at::kDouble));
  if (B == 0 || K == 0) return out;
  dim3 grid((K + kThreads - 1) / kThreads, (B + kColRows - 1) / kColRows);
  col_sum_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<float>(), w.data_ptr<double>(), B, K, out.data_ptr<double>());
  check_launch();
  return out;
}

}  // namespace

std::vector<at::Tensor> sinkhorn_init_cuda(const at::Tensor& scores, double eps, const at::Tensor& colmax) {
  TORCH_CHECK(scores.is_contiguous() && scores.dim() == 2, "sinkhorn_init: contiguous scores expected");
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  auto q = at::empty({B, K}, scores.options().dtype(at::kFloat));
  auto w = at::empty({B}, scores.options().dtype(at::kDouble));
  auto cm = colmax.to(at::kFloat).contiguous();
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_init_cuda", [&] {
      init_rows_kernel<scalar_t><<<B, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          scores.data_ptr<scalar_t>(), cm.data_ptr<float>(), static_cast<float>(eps), K, q.data_ptr<float>(),
          w.data_ptr<double>());
    });
    check_launch();
  }
  return {q, col_sums(q, w)};
}

at::Tensor sinkhorn_step_cuda(const at::Tensor& q, const at::Tensor& u) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  auto v = at::empty({B}, q.options().dtype(at::kDouble));
  if (B > 0) {
    row_kernel<<<B, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(q.data_ptr<float>(), ud.data_ptr<double>(), K,
                                                                      v.data_ptr<double>(), false);
    check_launch();
  }
  return col_sums(q, v);
}

at::Tensor sinkhorn_finish_cuda(at::Tensor q, const at::Tensor& u) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  if (B > 0) {
    row_kernel<<<B, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(q.data_ptr<float>(), ud.data_ptr<double>(), K,
                                                                      nullptr, true);
    check_launch();
  }
  return q;
}

}  // namespace sslops
