// Sinkhorn-Knopp (SwAV) on the CPU.
//
// Q' = exp(scores/eps - c[k] - r[b]) is computed once (fp32, the size of the output):
// c[k] is the global column max of scores/eps and r[b] the row max after that shift,
// so every row of Q' holds an exact 1 and nothing overflows. The column shift c cancels
// in SwAV's first normalisation (over samples); the row shift does not, so the first
// column sums weight row b by exp(r[b]) (float64). After the first per-sample
// normalisation the row shift cancels too, and the iterations only update the float64
// scaling vectors u (prototypes) and v (samples): one read of Q' per iteration, which
// computes v_b = 1 / sum_k Q'[b,k] u_k and, in the same pass, the next column sums
// sum_b Q'[b,k] v_b. Entries that underflow to 0 are below 2^-126 of their row's
// largest entry, and a row's weight exp(r[b]) only underflows where the row is
// negligible next to the column's largest entry (exactly 1): no inf, no nan, no 0/0.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sslops {
namespace {

constexpr int64_t kRowBlock = 16;  // rows per parallel_for grain

inline double dot_fd(const float* q, const double* u, int64_t n) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += q[i] * u[i];
    a1 += q[i + 1] * u[i + 1];
    a2 += q[i + 2] * u[i + 2];
    a3 += q[i + 3] * u[i + 3];
  }
  for (; i < n; ++i) a0 += q[i] * u[i];
  return (a0 + a1) + (a2 + a3);
}

// rows [0, n) split in `chunks` contiguous pieces; returns [begin, end) of piece c
inline std::pair<int64_t, int64_t> piece(int64_t n, int64_t chunks, int64_t c) {
  return {n * c / chunks, n * (c + 1) / chunks};
}

inline int64_t n_chunks(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work_items));
}

}  // namespace

std::vector<at::Tensor> sinkhorn_init_cpu(const at::Tensor& scores, double eps, const at::Tensor& colmax) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.dim() == 2,
              "sinkhorn_init: scores must be a contiguous float32 matrix");
  const int64_t B = scores.size(0), K = scores.size(1);
  const float e = static_cast<float>(eps);
  auto cm_t = colmax.to(at::kFloat).contiguous();
  std::vector<float> cm(K);
  const float* cmp = cm_t.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) cm[k] = cmp[k] / e;  // == max_b (scores[b,k] / e): division is monotone
  auto q = at::empty({B, K}, scores.options());
  const int64_t blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t chunks = n_chunks(blocks);
  auto partial = at::zeros({chunks, K}, scores.options().dtype(at::kDouble));
  const float* s = scores.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  double* pp = partial.data_ptr<double>();
  auto weights = at::empty({B}, scores.options().dtype(at::kDouble));
  double* wp = weights.data_ptr<double>();
  // 1) t = s/eps - c, row max r, Q' <- t - r, weight exp(r)   2) Q' <- exp(Q') (ATen's
  // vectorised exp, parallel inside; ATen calls inside a parallel_for worker measured
  // 20x slower on a loaded 2-core machine)   3) weighted column sums
  at::parallel_for(0, B, kRowBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* sr = s + b * K;
      float* qr = qp + b * K;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t k = 0; k < K; ++k) {
        const float t = sr[k] / e - cm[k];
        qr[k] = t;
        mx = t > mx ? t : mx;
      }
      if (!std::isfinite(mx)) mx = 0.f;
      for (int64_t k = 0; k < K; ++k) qr[k] -= mx;
      wp[b] = std::exp(static_cast<double>(mx));
    }
  });
  q.exp_();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = pp + c * K;
      auto range = piece(B, chunks, c);
      for (int64_t b = range.first; b < range.second; ++b) {
        const float* qr = qp + b * K;
        const double w = wp[b];
        for (int64_t k = 0; k < K; ++k) acc[k] += w * qr[k];
      }
    }
  });
  return {q, partial.sum(0)};
}

at::Tensor sinkhorn_step_cpu(const at::Tensor& q, const at::Tensor& u) {
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  const int64_t chunks = n_chunks((B + kRowBlock - 1) / kRowBlock);
  auto partial = at::zeros({chunks, K}, q.options().dtype(at::kDouble));
  const float* qp = q.data_ptr<float>();
  const double* up = ud.data_ptr<double>();
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = pp + c * K;
      auto range = piece(B, chunks, c);
      for (int64_t b = range.first; b < range.second; ++b) {
        const float* qr = qp + b * K;
        const double v = 1.0 / dot_fd(qr, up, K);
        for (int64_t k = 0; k < K; ++k) acc[k] += qr[k] * v;
      }
    }
  });
  return partial.sum(0);
}

at::Tensor sinkhorn_finish_cpu(at::Tensor q, const at::Tensor& u) {
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  float* qp = q.data_ptr<float>();
  const double* up = ud.data_ptr<double>();
  at::parallel_for(0, B, kRowBlock, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* qr = qp + b * K;
      const double inv = 1.0 / dot_fd(qr, up, K);
      for (int64_t k = 0; k < K; ++k) qr[k] = static_cast<float>(qr[k] * up[k] * inv);
    }
  });
  return q;
}

}  // namespace sslops
