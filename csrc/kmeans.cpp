// k-means hot loops on the CPU: the assignment (chunked GEMM + arg-max, never N x K)
// and the centroid update (per-thread float64 sums and counts, then one reduction).
// Initialisation, empty-cluster re-seeding, normalisation and the all-reduces of the
// sums and counts are done by common/ops.py around these calls.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace sslops {

std::vector<at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t chunk) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat, "kmeans (CPU kernel): float32 expected");
  const int64_t N = x.size(0), K = c.size(0);
  const int64_t rows = chunk > 0 ? chunk : 4096;
  auto cc = c.contiguous();
  auto ct = cc.t();
  at::Tensor half_sq;
  if (!spherical) half_sq = 0.5 * (cc * cc).sum(1);
  auto best_score = at::empty({N}, x.options());
  auto best = at::empty({N}, x.options().dtype(at::kLong));
  const int64_t tiles = (N + rows - 1) / rows;
  // chunks run one after the other, each GEMM and arg-max parallel inside (BLAS, ATen's
  // at::parallel_for): a BLAS call inside an at::parallel_for region nests OpenMP teams.
  auto buf = at::empty({std::min(rows, N) * K}, x.options());
  {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * rows, R = std::min(rows, N - r0);
      auto s = buf.narrow(0, 0, R * K).view({R, K});
      at::mm_out(s, x.narrow(0, r0, R), ct);
      if (!spherical) s.sub_(half_sq);
      auto vals = best_score.narrow(0, r0, R);
      auto idx = best.narrow(0, r0, R);
      at::max_out(vals, idx, s, 1);
    }
  }
  return {best_score, best};
}

std::vector<at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& assign, int64_t k) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "kmeans (CPU kernel): contiguous float32 expected");
  auto a = assign.to(at::kLong).contiguous();
  const int64_t N = x.size(0), D = x.size(1);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 4095) / 4096));
  auto sums = at::zeros({chunks, k, D}, x.options().dtype(at::kDouble));
  auto counts = at::zeros({chunks, k}, x.options().dtype(at::kDouble));
  const float* xp = x.data_ptr<float>();
  const int64_t* ap = a.data_ptr<int64_t>();
  double* sp = sums.data_ptr<double>();
  double* cp = counts.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* s = sp + c * k * D;
      double* cnt = cp + c * k;
      const int64_t i0 = N * c / chunks, i1 = N * (c + 1) / chunks;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j = ap[i];
        const float* xi = xp + i * D;
        double* sj = s + j * D;
        for (int64_t d = 0; d < D; ++d) sj[d] += xi[d];
        cnt[j] += 1;
      }
    }
  });
  return {sums.sum(0).to(at::kFloat), counts.sum(0).to(at::kFloat)};
}

}  // namespace sslops
