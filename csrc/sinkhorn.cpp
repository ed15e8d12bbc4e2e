// Sinkhorn-Knopp (SwAV) on the CPU.
//
// Q' = exp((scores - c[k])/eps - r[b]) is computed once (fp32, the size of the output):
// c[k] is the global column max of scores and r[b] the row max after that shift,
// so every row of Q' holds an exact 1 and nothing overflows. The column shift c cancels
// in SwAV's first normalisation (over samples); the row shift does not, so the first
// column sums weight row b by exp(r[b]) (float64). After the first per-sample
// normalisation the row shift cancels too, and the iterations only update the float64
// scaling vectors u (prototypes) and v (samples): one read of Q' per iteration, which
// computes v_b = 1 / sum_k Q'[b,k] u_k and, in the same pass, the next column sums
// sum_b Q'[b,k] v_b. Entries that underflow to 0 are below 2^-126 of their row's
// largest entry, and a row's weight exp(r[b]) only underflows where the row is
// negligible next to the column's largest entry (exactly 1): no inf, no nan, no 0/0.
//
// The column max itself is one parallel read (column_max_cpu, a NaN propagates as in
// torch.amax). Three kinds of pass, each one read of a row while it sits in L1: init (shift, exp,
// weighted column sums), step (v_b, next column sums), finish (write the output in
// place). The loops are AVX2 (csrc/simd.h) where the CPU has it, scalar otherwise; the
// AVX2 passes take four rows at a time, so the float64 vectors (u, column sums) are read
// once per four rows, with each row's arithmetic unchanged (bit-identical results).
#include "ops.h"
#include "memory.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sslops {
namespace {

// rows [0, n) split in `chunks` contiguous pieces; returns [begin, end) of piece c
inline std::pair<int64_t, int64_t> piece(int64_t n, int64_t chunks, int64_t c) {
  return {n * c / chunks, n * (c + 1) / chunks};
}

// one piece of rows per thread (each with its own column-sum accumulator), at least 16 rows each
inline int64_t n_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + 15) / 16));
}

// Runs fn(b0, b1, acc) on the pieces in parallel; returns the sum of the per-piece
// float64 accumulators acc[K] (zeroed before).
template <typename Fn>
at::Tensor over_pieces(const at::Tensor& like, int64_t B, int64_t K, const Fn& fn) {
  const int64_t chunks = n_chunks(B);
  auto partial = at::zeros({chunks, K}, like.options().dtype(at::kDouble));
  double* pp = partial.data_ptr<double>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto range = piece(B, chunks, c);
      fn(range.first, range.second, pp + c * K);
    }
  });
  return partial.sum(0);
}

// q[k] <- (s[k] - cm[k]) * inv_e ; returns the row max (-inf for an empty row). A multiply,
// not a divide (which costs more than the exp here): measured as accurate against float64.
float shift_row_scalar(const float* s, const float* cm, float inv_e, float* q, int64_t k0, int64_t K, float mx) {
  for (int64_t k = k0; k < K; ++k) {
    q[k] = (s[k] - cm[k]) * inv_e;
    mx = q[k] > mx ? q[k] : mx;
  }
  return mx;
}

// q[k] <- exp(q[k] - mx) ; acc[k] += w * q[k]
void exp_row_accumulate_scalar(float* q, float mx, double w, double* acc, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k) {
    q[k] = std::exp(q[k] - mx);
    acc[k] += w * q[k];
  }
}

// q[k] <- exp(q[k] - mx)
void exp_row_scalar(float* q, float mx, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k) q[k] = std::exp(q[k] - mx);
}

#if SSLOPS_X86
SSLOPS_AVX2 void exp_row_avx2(float* q, float mx, int64_t K) {
  const __m256 m = _mm256_set1_ps(mx);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(q + k, simd::exp256(_mm256_sub_ps(_mm256_loadu_ps(q + k), m)));
  exp_row_scalar(q, mx, k, K);
}

SSLOPS_AVX2 float shift_row_avx2(const float* s, const float* cm, float inv_e, float* q, int64_t K) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 ev = _mm256_set1_ps(inv_e);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + k), _mm256_loadu_ps(cm + k)), ev);
    _mm256_storeu_ps(q + k, t);
    m = _mm256_max_ps(m, t);
  }
  return shift_row_scalar(s, cm, inv_e, q, k, K, simd::hmax256(m));
}

SSLOPS_AVX2 void exp_row_accumulate_avx2(float* q, float mx, double w, double* acc, int64_t K) {
  const __m256 m = _mm256_set1_ps(mx);
  const __m256d wv = _mm256_set1_pd(w);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 y = simd::exp256(_mm256_sub_ps(_mm256_loadu_ps(q + k), m));
    _mm256_storeu_ps(q + k, y);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(y)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1));
    _mm256_storeu_pd(acc + k, _mm256_fmadd_pd(wv, lo, _mm256_loadu_pd(acc + k)));
    _mm256_storeu_pd(acc + k + 4, _mm256_fmadd_pd(wv, hi, _mm256_loadu_pd(acc + k + 4)));
  }
  exp_row_accumulate_scalar(q, mx, w, acc, k, K);
}
#endif

// acc[k] <- max(acc[k], x[k]); a NaN sticks (as in torch.amax)
void max_into_scalar(const float* x, float* acc, int64_t k0, int64_t K) {
  for (int64_t k = k0; k < K; ++k)
    if (x[k] > acc[k] || x[k] != x[k]) acc[k] = x[k];
}

#if SSLOPS_X86
SSLOPS_AVX2 void max_into_avx2(const float* x, float* acc, int64_t K) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    const __m256 m = _mm256_max_ps(xv, _mm256_loadu_ps(acc + k));  // acc's NaN wins here...
    _mm256_storeu_ps(acc + k, _mm256_blendv_ps(m, xv, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q)));  // ...x's here
  }
  max_into_scalar(x, acc, k, K);
}
#endif

void max_into(const float* x, float* acc, int64_t K) {
#if SSLOPS_X86
  if (simd::have_avx2()) return max_into_avx2(x, acc, K);
#endif
  max_into_scalar(x, acc, 0, K);
}

float shift_row(const float* s, const float* cm, float inv_e, float* q, int64_t K) {
#if SSLOPS_X86
  if (simd::have_avx2()) return shift_row_avx2(s, cm, inv_e, q, K);
#endif
  return shift_row_scalar(s, cm, inv_e, q, 0, K, -std::numeric_limits<float>::infinity());
}

void exp_row_accumulate(float* q, float mx, double w, double* acc, int64_t K) {
#if SSLOPS_X86
  if (simd::have_avx2()) return exp_row_accumulate_avx2(q, mx, w, acc, K);
#endif
  exp_row_accumulate_scalar(q, mx, w, acc, 0, K);
}

}  // namespace

at::Tensor column_max_cpu(const at::Tensor& scores) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.dim() == 2 && !scores.is_cuda(),
              "column_max: scores must be a contiguous float32 CPU matrix");
  const int64_t B = scores.size(0), K = scores.size(1);
  const int64_t chunks = n_chunks(B);
  auto partial = at::full({chunks, K}, -std::numeric_limits<float>::infinity(), scores.options());
  const float* s = scores.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto range = piece(B, chunks, c);
      for (int64_t b = range.first; b < range.second; ++b) max_into(s + b * K, pp + c * K, K);
    }
  });
  for (int64_t c = 1; c < chunks; ++c) max_into(pp + c * K, pp, K);
  return partial[0].clone();
}

std::vector<at::Tensor> sinkhorn_init_cpu(const at::Tensor& scores, double eps, const at::Tensor& colmax) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.dim() == 2,
              "sinkhorn_init: scores must be a contiguous float32 matrix");
  const int64_t B = scores.size(0), K = scores.size(1);
  const float inv_e = static_cast<float>(1.0 / eps);
  auto cm_t = colmax.to(at::kFloat).contiguous();
  const float* cm = cm_t.data_ptr<float>();
  auto q = empty_huge({B, K}, scores.options());
  const float* s = scores.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  auto colsum = over_pieces(scores, B, K, [&](int64_t b0, int64_t b1, double* acc) {
    int64_t b = b0;
#if SSLOPS_X86
    if (simd::have_avx2())
      for (; b + 4 <= b1; b += 4) {  // four rows per read of acc (bit-identical to one by one)
        float* rows[4];
        double w[4];
        for (int r = 0; r < 4; ++r) {
          rows[r] = qp + (b + r) * K;
          float mx = shift_row(s + (b + r) * K, cm, inv_e, rows[r], K);
          if (!std::isfinite(mx)) mx = 0.f;
          exp_row_avx2(rows[r], mx, K);
          w[r] = std::exp(static_cast<double>(mx));
        }
        simd::axpy4_fd_avx2(w, rows, acc, K);
      }
#endif
    for (; b < b1; ++b) {
      float* qr = qp + b * K;
      float mx = shift_row(s + b * K, cm, inv_e, qr, K);
      if (!std::isfinite(mx)) mx = 0.f;
      exp_row_accumulate(qr, mx, std::exp(static_cast<double>(mx)), acc, K);
    }
  });
  return {q, colsum};
}

at::Tensor sinkhorn_step_cpu(const at::Tensor& q, const at::Tensor& u) {
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  const float* qp = q.data_ptr<float>();
  const double* up = ud.data_ptr<double>();
  return over_pieces(q, B, K, [&](int64_t b0, int64_t b1, double* acc) {
    int64_t b = b0;
#if SSLOPS_X86
    if (simd::have_avx2())
      for (; b + 4 <= b1; b += 4) {  // four rows per read of u and acc (bit-identical to one by one)
        const float* rows[4] = {qp + b * K, qp + (b + 1) * K, qp + (b + 2) * K, qp + (b + 3) * K};
        double w[4];
        simd::dot4_fd_avx2(rows, up, K, w);
        for (double& x : w) x = 1.0 / x;
        simd::axpy4_fd_avx2(w, rows, acc, K);
      }
#endif
    for (; b < b1; ++b) {
      const float* qr = qp + b * K;
      simd::axpy_fd(1.0 / simd::dot_fd(qr, up, K), qr, acc, K);
    }
  });
}

at::Tensor sinkhorn_finish_cpu(at::Tensor q, const at::Tensor& u) {
  const int64_t B = q.size(0), K = q.size(1);
  auto ud = u.to(at::kDouble).contiguous();
  float* qp = q.data_ptr<float>();
  const double* up = ud.data_ptr<double>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    int64_t b = b0;
#if SSLOPS_X86
    if (simd::have_avx2())
      for (; b + 4 <= b1; b += 4) {
        const float* rows[4] = {qp + b * K, qp + (b + 1) * K, qp + (b + 2) * K, qp + (b + 3) * K};
        double d[4];
        simd::dot4_fd_avx2(rows, up, K, d);
        for (int r = 0; r < 4; ++r) simd::scale_fd(qp + (b + r) * K, up, 1.0 / d[r], K);
      }
#endif
    for (; b < b1; ++b) {
      float* qr = qp + b * K;
      simd::scale_fd(qr, up, 1.0 / simd::dot_fd(qr, up, K), K);
    }
  });
  return q;
}

}  // namespace sslops
