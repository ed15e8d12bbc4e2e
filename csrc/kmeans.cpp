// k-means hot loops on the CPU: the assignment (chunked GEMM + arg-max, never N x K)
// and the centroid update (per-thread float64 sums and counts, then one reduction).
// Initialisation, empty-cluster re-seeding, normalisation and the all-reduces of the
// sums and counts are done by common/ops.py around these calls.
//
// Screened assignment (CPUs with native bf16 dot products, AVX512_BF16): the GEMM runs
// in bf16 (about 4.7x the fp32 GEMM's speed on a 2-core Zen 4), which only shortlists
// centroids. With u = 2^-8 (bf16's unit roundoff), products of rounded inputs, fp32
// accumulation of D terms and a bf16 output differ from the exact x.c by at most
//     |x| |c| (3u + 3u^2 + u^3 + 2 D 2^-24)        (bound() below, with a 2x margin on the last term)
// so no centroid whose screened score is more than twice that below the row's screened
// best can be the best. The shortlist (on uniform 128-d data, a couple of centroids per
// row) is rescored exactly in fp32 from x and c: the result is the fp32 arg-max, the
// same as the plain GEMM's up to rounding-level ties.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

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

namespace {

constexpr double kBf16Roundoff = 1.0 / 256;

double bound(int64_t D) {
  const double u = kBf16Roundoff;
  return 3 * u + 3 * u * u + u * u * u + 4.0 * static_cast<double>(D) * std::ldexp(1.0, -24);
}

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// indices j with screened[j] - half[j] >= threshold, written to `out`; returns how many
int64_t shortlist_scalar(const uint16_t* screened, const float* half, float threshold, int64_t j0, int64_t K,
                         int64_t* out) {
  int64_t n = 0;
  for (int64_t j = j0; j < K; ++j)
    if (bf16_to_float(screened[j]) - half[j] >= threshold) out[n++] = j;
  return n;
}

float screened_max_scalar(const uint16_t* screened, const float* half, int64_t K) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < K; ++j) m = std::max(m, bf16_to_float(screened[j]) - half[j]);
  return m;
}

#if SSLOPS_X86
SSLOPS_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  __m256 v = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float s = _mm_cvtss_f32(h);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// 8 bf16 values widened to float32 (bf16 is the top half of a float32)
SSLOPS_AVX2 inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

SSLOPS_AVX2 float screened_max_avx2(const uint16_t* screened, const float* half, int64_t K) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= K; j += 8) {
    const __m256 w = load_bf16x8(screened + j);
    m = _mm256_max_ps(m, _mm256_sub_ps(w, _mm256_loadu_ps(half + j)));
  }
  float r = simd::hmax256(m);
  for (; j < K; ++j) r = std::max(r, bf16_to_float(screened[j]) - half[j]);
  return r;
}

SSLOPS_AVX2 int64_t shortlist_avx2(const uint16_t* screened, const float* half, float threshold, int64_t K,
                                   int64_t* out) {
  const __m256 t = _mm256_set1_ps(threshold);
  int64_t n = 0, j = 0;
  for (; j + 8 <= K; j += 8) {
    const __m256 w = load_bf16x8(screened + j);
    int mask = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_sub_ps(w, _mm256_loadu_ps(half + j)), t, _CMP_GE_OQ));
    while (mask) {
      out[n++] = j + __builtin_ctz(mask);
      mask &= mask - 1;
    }
  }
  return n + shortlist_scalar(screened, half, threshold, j, K, out + n);
}
#endif

}  // namespace

bool cpu_has_bf16_dot() {
#if SSLOPS_X86
  static const bool ok = __builtin_cpu_supports("avx512bf16") && simd::have_avx2() &&
                         !(std::getenv("SSL_OPS_NO_BF16") && std::getenv("SSL_OPS_NO_BF16")[0] == '1');
  return ok;
#else
  return false;
#endif
}

std::vector<at::Tensor> kmeans_assign_screened_cpu(const at::Tensor& x, const at::Tensor& x_bf16,
                                                   const at::Tensor& x_norm, const at::Tensor& c, bool spherical,
                                                   int64_t chunk) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && c.scalar_type() == at::kFloat &&
                  x_bf16.scalar_type() == at::kBFloat16 && x_norm.scalar_type() == at::kFloat,
              "kmeans (screened CPU kernel): float32 x, c, x_norm and bfloat16 x_bf16 expected");
  const int64_t N = x.size(0), D = x.size(1), K = c.size(0);
  const int64_t rows = chunk > 0 ? chunk : 2048;
  auto cc = c.contiguous();
  auto c_low_t = cc.to(at::kBFloat16).t();
  auto half = spherical ? at::zeros({K}, cc.options()) : (0.5 * (cc * cc).sum(1)).contiguous();
  const double c_max_norm = K ? cc.norm(2, 1).max().item<double>() : 0.0;
  const double rel = bound(D) * c_max_norm;
  const double h_max = K ? half.abs().max().item<double>() : 0.0;
  auto best_score = at::empty({N}, x.options());
  auto best = at::empty({N}, x.options().dtype(at::kLong));
  auto buf = at::empty({std::min(rows, N) * K}, x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* hp = half.data_ptr<float>();
  const float* np = x_norm.data_ptr<float>();
  float* bsp = best_score.data_ptr<float>();
  int64_t* bp = best.data_ptr<int64_t>();
  const bool avx2 = simd::have_avx2();
  float (*dot)(const float*, const float*, int64_t) = dot_scalar;
#if SSLOPS_X86
  if (avx2) dot = dot_avx2;
#endif
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t R = std::min(rows, N - r0);
    auto s = buf.narrow(0, 0, R * K).view({R, K});
    at::mm_out(s, x_bf16.narrow(0, r0, R), c_low_t);  // BLAS / oneDNN, parallel inside
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
    at::parallel_for(0, R, 64, [&](int64_t i0, int64_t i1) {
      std::vector<int64_t> candidates(K);
      for (int64_t i = i0; i < i1; ++i) {
        const uint16_t* row = sp + i * K;
        const float* xi = xp + (r0 + i) * D;
        float m;
        int64_t n;
#if SSLOPS_X86
        if (avx2)
          m = screened_max_avx2(row, hp, K);
        else
#endif
          m = screened_max_scalar(row, hp, K);
        // twice the bound (the best's screened score may be low by it, another's high by it),
        // plus the float rounding of "screened - half" on both sides of the comparison
        const double slack = 2.0 * rel * np[r0 + i] + 8 * std::ldexp(1.0, -24) * (std::fabs(m) + h_max) + 1e-30;
        float threshold = static_cast<float>(m - slack);
        if (!std::isfinite(threshold)) threshold = -std::numeric_limits<float>::infinity();
#if SSLOPS_X86
        if (avx2)
          n = shortlist_avx2(row, hp, threshold, K, candidates.data());
        else
#endif
          n = shortlist_scalar(row, hp, threshold, 0, K, candidates.data());
        float top = -std::numeric_limits<float>::infinity();
        int64_t arg = n ? candidates[0] : 0;
        for (int64_t c = 0; c < n; ++c) {  // ascending j: ties keep the lowest index
          const int64_t j = candidates[c];
          const float exact = dot(xi, cp + j * D, D) - hp[j];
          if (c == 0 || exact > top) top = exact, arg = j;
        }
        bsp[r0 + i] = top;
        bp[r0 + i] = arg;
      }
    });
  }
  return {best_score, best};
}

}  // namespace sslops
