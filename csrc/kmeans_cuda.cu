// k-means on CUDA: the ATen side of csrc/kernels/kmeans.cuh (the kernels, also built against
// the CPU emulator by the tests). Assignment: one fused GEMM + running arg-max kernel, no score
// matrix; fp32 FMA, or TF32 tensor cores when the caller passes tf32 (never a global flag).
// Update: a stable sort of the row indices by assignment (ATen), then fixed-order float64 sums
// (deterministic). `chunk` (the CPU kernel's rows per GEMM) has no meaning here.
#include "cuda_utils.cuh"
#include "kernels/kmeans.cuh"
#include "ops.h"

namespace sslops {

std::vector<at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t /*chunk*/,
                                           bool tf32) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "kmeans_assign (CUDA): contiguous float32 points expected");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), K = c.size(0), D = x.size(1);
  auto cc = c.to(at::kFloat).contiguous();
  at::Tensor half_sq;
  if (!spherical) half_sq = (0.5 * (cc * cc).sum(1)).contiguous();
  auto best_score = at::empty({N}, x.options());
  auto best = at::empty({N}, x.options().dtype(at::kLong));
  const size_t max_shared = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  kmeans::assign(x.data_ptr<float>(), cc.data_ptr<float>(), spherical ? nullptr : half_sq.data_ptr<float>(), N, K, D,
                 tf32, best_score.data_ptr<float>(), best.data_ptr<int64_t>(), max_shared,
                 at::cuda::getCurrentCUDAStream());
  cuda::check_launch();
  return {best_score, best};
}

std::vector<at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& assign, int64_t k) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "kmeans_update (CUDA): contiguous float32 points expected");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), D = x.size(1);
  auto a = assign.to(at::kLong).contiguous();
  auto order = std::get<1>(at::sort(a, /*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
  auto count = at::bincount(a, c10::nullopt, k);
  auto offsets = at::zeros({k + 1}, a.options());
  offsets.narrow(0, 1, k).copy_(count.cumsum(0));
  auto piece_offsets = at::zeros({k + 1}, a.options());
  piece_offsets.narrow(0, 1, k).copy_(at::floor_divide(count + (kmeans::kPieceRows - 1), kmeans::kPieceRows).cumsum(0));
  auto partial = at::empty({std::max<int64_t>(1, kmeans::max_pieces(N, k) * D)}, x.options().dtype(at::kDouble));
  auto sums = at::empty({k, D}, x.options());
  auto counts = at::empty({k}, x.options());
  kmeans::update(x.data_ptr<float>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                 piece_offsets.data_ptr<int64_t>(), N, k, D, partial.data_ptr<double>(), sums.data_ptr<float>(),
                 counts.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  cuda::check_launch();
  return {sums, counts};
}

}  // namespace sslops
