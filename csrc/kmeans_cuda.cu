// k-means hot loops on CUDA: assignment by chunks of rows (cuBLAS GEMM, TF32 as set in
// torch.backends.cuda.matmul.allow_tf32, then arg-max over at most kChunkElems scores),
// centroid sums by index_add_ (atomic reduction) and counts by bincount.
#include "cuda_utils.cuh"
#include "ops.h"

namespace sslops {
namespace {
constexpr int64_t kChunkElems = int64_t(1) << 25;  // 128 MB of fp32 scores at most
}

std::vector<at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t chunk) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = c.size(0);
  const int64_t rows = chunk > 0 ? chunk : std::max<int64_t>(1, kChunkElems / std::max<int64_t>(K, 1));
  auto cc = c.contiguous();
  at::Tensor half_sq;
  if (!spherical) half_sq = 0.5 * (cc * cc).sum(1);
  auto best_score = at::empty({N}, x.options());
  auto best = at::empty({N}, x.options().dtype(at::kLong));
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t R = std::min(rows, N - r0);
    auto s = at::mm(x.narrow(0, r0, R), cc.t());
    if (!spherical) s.sub_(half_sq);
    auto vals = best_score.narrow(0, r0, R);
    auto idx = best.narrow(0, r0, R);
    at::max_out(vals, idx, s, 1);
  }
  return {best_score, best};
}

std::vector<at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& assign, int64_t k) {
  c10::cuda::CUDAGuard guard(x.device());
  auto a = assign.to(at::kLong);
  auto sums = at::zeros({k, x.size(1)}, x.options().dtype(at::kFloat));
  sums.index_add_(0, a, x.to(at::kFloat));
  auto counts = at::bincount(a, c10::nullopt, k).to(at::kFloat);
  return {sums, counts};
}

}  // namespace sslops
