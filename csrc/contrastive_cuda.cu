// Fused contrastive loss on CUDA.
//
// Tiles of TQ queries x TK keys: the logits tile is one cuBLAS GEMM (tensor cores for
// bf16/fp16 inputs via cublasGemmEx with fp32 accumulation and fp32 output; fp32 inputs
// go through at::mm, so TF32 follows torch.backends.cuda.matmul.allow_tf32), then a
// row kernel folds the tile into the running max / sum per row (online log-sum-exp),
// leaves out column self_index and picks the positive logit. Backward recomputes each
// tile, turns it into dL/dlogits = g (softmax - onehot(pos)) (cast to the input dtype
// for the tensor-core GEMMs, as flash attention does) and accumulates dQ and dK with
// two more GEMMs. Extra memory: O((N + M) * D + TQ * TK), never N x M.
#include <cublas_v2.h>

#include "cuda_utils.cuh"
#include "ops.h"

namespace sslops {
namespace {
using namespace sslops::cuda;

constexpr int64_t kTileQ = 4096;
constexpr int64_t kTileK = 4096;

cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, "contrastive_loss (CUDA kernel): unsupported dtype ", t);
  }
  return CUDA_R_32F;
}

// C (row-major fp32 [m, n]) = alpha * op(A) op(B) + beta * C, A and B row-major, same dtype.
// fp32 operands go through ATen (TF32 as configured); half operands through cublasGemmEx.
void gemm(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, at::Tensor& C, float alpha, float beta) {
  if (A.scalar_type() == at::kFloat) {
    auto a = ta ? A.t() : A;
    auto b = tb ? B.t() : B;
    if (beta == 0.f) {
      at::mm_out(C, a, b);
      if (alpha != 1.f) C.mul_(alpha);
    } else {
      C.addmm_(a, b, beta, alpha);
    }
    return;
  }
  TORCH_CHECK(A.is_contiguous() && B.is_contiguous() && C.is_contiguous(), "gemm: contiguous operands expected");
  const int m = static_cast<int>(C.size(0)), n = static_cast<int>(C.size(1));
  const int k = static_cast<int>(ta ? A.size(0) : A.size(1));
  const int lda = static_cast<int>(A.size(1)), ldb = static_cast<int>(B.size(1)), ldc = n;
  const cudaDataType_t dt = cuda_dtype(A.scalar_type());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T
  const cublasStatus_t status = cublasGemmEx(
      handle, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, B.data_ptr(), dt, ldb,
      A.data_ptr(), dt, lda, &beta, C.data_ptr(), CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "cublasGemmEx failed with status ", static_cast<int>(status));
}

// one block per row r of the tile s [R, kt]: online log-sum-exp update of m, l; positive logit
__global__ void forward_tile_kernel(const float* __restrict__ s, int64_t kt, int64_t q0, int64_t k0,
                                    const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
                                    float* __restrict__ m, float* __restrict__ l, float* __restrict__ pl) {
  __shared__ float shm[32];
  const int64_t r = blockIdx.x, i = q0 + r;
  const float* row = s + r * kt;
  const int64_t skip = self != nullptr ? self[i] - k0 : -1;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < kt; j += blockDim.x)
    if (j != skip) mx = fmaxf(mx, row[j]);
  mx = block_max(mx, shm);
  const float old_m = m[i];
  const float new_m = fmaxf(old_m, mx);
  const float shift = new_m == -INFINITY ? 0.f : new_m;
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < kt; j += blockDim.x)
    if (j != skip) acc += expf(row[j] - shift);
  acc = block_sum(acc, shm);
  if (threadIdx.x == 0) {
    l[i] = l[i] * expf(old_m - shift) + acc;
    m[i] = new_m;
    const int64_t p = pos[i] - k0;
    if (p >= 0 && p < kt) pl[i] = row[p];
  }
}

__global__ void forward_finish_kernel(int64_t n, const float* __restrict__ m, const float* __restrict__ l,
                                      const float* __restrict__ pl, float* __restrict__ loss, float* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = m[i] + logf(l[i]);
  lse[i] = v;
  loss[i] = v - pl[i];
}

// g_i (softmax_ij - [j == pos_i]) for the tile, self column 0; written as fp32 into s or as T into out
template <typename T>
__global__ void backward_tile_kernel(float* __restrict__ s, int64_t R, int64_t kt, int64_t q0, int64_t k0,
                                     const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
                                     const float* __restrict__ lse, const float* __restrict__ g, T* __restrict__ out) {
  const int64_t total = R * kt;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / kt, j = idx - r * kt, i = q0 + r;
    float p = (self != nullptr && self[i] - k0 == j) ? 0.f : expf(s[idx] - lse[i]);
    if (pos[i] - k0 == j) p -= 1.f;
    const float v = g[i] * p;
    if (out != nullptr) out[idx] = static_cast<T>(v); else s[idx] = v;
  }
}

int64_t grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8;
}

}  // namespace

std::vector<at::Tensor> contrastive_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 int64_t tile_q, int64_t tile_k) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), M = k.size(0);
  auto fopt = q.options().dtype(at::kFloat);
  auto loss = at::empty({N}, fopt), lse = at::empty({N}, fopt);
  if (N == 0) return {loss, lse};
  const int64_t TQ = tile_q > 0 ? tile_q : kTileQ;
  const int64_t TK = std::min<int64_t>(tile_k > 0 ? tile_k : kTileK, M);
  auto m = at::full({N}, -INFINITY, fopt), l = at::zeros({N}, fopt), pl = at::empty({N}, fopt);
  auto buf = at::empty({std::min(TQ, N) * TK}, fopt);
  const int64_t* sp = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t q0 = 0; q0 < N; q0 += TQ) {
    const int64_t R = std::min(TQ, N - q0);
    auto qt = q.narrow(0, q0, R);
    for (int64_t k0 = 0; k0 < M; k0 += TK) {
      const int64_t kt = std::min(TK, M - k0);
      auto s = buf.narrow(0, 0, R * kt).view({R, kt});
      gemm(qt, false, k.narrow(0, k0, kt), true, s, inv_t, 0.f);
      forward_tile_kernel<<<R, kThreads, 0, stream>>>(s.data_ptr<float>(), kt, q0, k0, pos.data_ptr<int64_t>(), sp,
                                                      m.data_ptr<float>(), l.data_ptr<float>(), pl.data_ptr<float>());
      check_launch();
    }
  }
  forward_finish_kernel<<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      N, m.data_ptr<float>(), l.data_ptr<float>(), pl.data_ptr<float>(), loss.data_ptr<float>(), lse.data_ptr<float>());
  check_launch();
  return {loss, lse};
}

std::vector<at::Tensor> contrastive_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                  const c10::optional<at::Tensor>& self, double temperature,
                                                  const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dk,
                                                  int64_t tile_q, int64_t tile_k) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  auto fopt = q.options().dtype(at::kFloat);
  auto dq = at::zeros({N, D}, fopt);
  auto dk = need_dk ? at::zeros({M, D}, fopt) : at::Tensor();
  if (N == 0) return {dq, dk};
  const int64_t TQ = tile_q > 0 ? tile_q : kTileQ;
  const int64_t TK = std::min<int64_t>(tile_k > 0 ? tile_k : kTileK, M);
  auto buf = at::empty({std::min(TQ, N) * TK}, fopt);
  const bool half = q.scalar_type() != at::kFloat;
  auto gbuf = half ? at::empty({std::min(TQ, N) * TK}, q.options()) : at::Tensor();
  auto lse_c = lse.to(at::kFloat).contiguous();
  auto g_c = grad_rows.to(at::kFloat).contiguous();
  const int64_t* sp = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t q0 = 0; q0 < N; q0 += TQ) {
    const int64_t R = std::min(TQ, N - q0);
    auto qt = q.narrow(0, q0, R);
    auto dqt = dq.narrow(0, q0, R);
    for (int64_t k0 = 0; k0 < M; k0 += TK) {
      const int64_t kt = std::min(TK, M - k0);
      auto ktile = k.narrow(0, k0, kt);
      auto s = buf.narrow(0, 0, R * kt).view({R, kt});
      gemm(qt, false, ktile, true, s, inv_t, 0.f);
      at::Tensor gt = half ? gbuf.narrow(0, 0, R * kt).view({R, kt}) : s;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "contrastive_backward_cuda", [&] {
        backward_tile_kernel<scalar_t><<<grid_for(R * kt), kThreads, 0, stream>>>(
            s.data_ptr<float>(), R, kt, q0, k0, pos.data_ptr<int64_t>(), sp, lse_c.data_ptr<float>(),
            g_c.data_ptr<float>(), half ? gt.data_ptr<scalar_t>() : nullptr);
      });
      check_launch();
      gemm(gt, false, ktile, false, dqt, inv_t, 1.f);
      if (need_dk) {
        auto dkt = dk.narrow(0, k0, kt);
        gemm(gt, true, qt, false, dkt, inv_t, 1.f);
      }
    }
  }
  return {dq, dk};
}

}  // namespace sslops
