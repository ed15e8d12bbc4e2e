// Vector helpers for the CPU kernels: AVX2 + FMA code chosen at run time, scalar code otherwise.
//
// The extension is compiled for the baseline x86-64 (SSE2) so that one build runs on any
// machine; the hot loops below carry `SSLOPS_AVX2` (GCC/Clang's target attribute) and are
// called only when the CPU reports AVX2 and FMA. Everything a caller needs has both
// versions: `have_avx2()` picks (SSL_OPS_NO_SIMD=1 in the environment forces the scalar
// code, which the tests use to check it too). Non-x86 builds get the scalar versions only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SSLOPS_X86 1
#include <immintrin.h>
#define SSLOPS_AVX2 __attribute__((target("avx2,fma")))
#else
#define SSLOPS_X86 0
#endif

namespace sslops {
namespace simd {

inline bool have_avx2() {
#if SSLOPS_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         !(std::getenv("SSL_OPS_NO_SIMD") && std::getenv("SSL_OPS_NO_SIMD")[0] == '1');
  return ok;
#else
  return false;
#endif
}

#if SSLOPS_X86
// exp of 8 floats (Cephes' expf: Cody-Waite range reduction, degree-5 polynomial; about
// 1 ulp). Meant for x <= 0 (inputs above 88 are clamped to 88): inputs below -87.33 give
// exactly 0 (expf underflows there into subnormals, which these kernels treat as 0);
// NaN stays NaN.
SSLOPS_AVX2 inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.0f), lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, x);  // min/max return their second operand when one is NaN: x goes second
  x = _mm256_max_ps(lo, x);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
  return _mm256_andnot_ps(underflow, y);
}

SSLOPS_AVX2 inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

SSLOPS_AVX2 inline double hsum256d(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// sum_i q[i] * u[i], q float32, u and the accumulation float64
SSLOPS_AVX2 inline double dot_fd_avx2(const float* q, const double* u, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + i)), _mm256_loadu_pd(u + i), a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + i + 4)), _mm256_loadu_pd(u + i + 4), a1);
  }
  double s = hsum256d(_mm256_add_pd(a0, a1));
  for (; i < n; ++i) s += static_cast<double>(q[i]) * u[i];
  return s;
}

// acc[i] += w * q[i], q float32, acc float64
SSLOPS_AVX2 inline void axpy_fd_avx2(double w, const float* q, double* acc, int64_t n) {
  const __m256d wv = _mm256_set1_pd(w);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    _mm256_storeu_pd(acc + i, _mm256_fmadd_pd(wv, _mm256_cvtps_pd(_mm_loadu_ps(q + i)), _mm256_loadu_pd(acc + i)));
  for (; i < n; ++i) acc[i] += w * q[i];
}

// Four rows at once, one read of u and of acc for all four (u and acc are the large
// float64 vectors; the rows are float32). Each row's arithmetic is exactly that of
// dot_fd_avx2 / axpy_fd_avx2, in the same order: the results are bit-identical.
SSLOPS_AVX2 inline void dot4_fd_avx2(const float* const q[4], const double* u, int64_t n, double out[4]) {
  __m256d a[4][2];
  for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256d u0 = _mm256_loadu_pd(u + i), u1 = _mm256_loadu_pd(u + i + 4);
    for (int r = 0; r < 4; ++r) {
      a[r][0] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q[r] + i)), u0, a[r][0]);
      a[r][1] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(q[r] + i + 4)), u1, a[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    double s = hsum256d(_mm256_add_pd(a[r][0], a[r][1]));
    for (int64_t j = i; j < n; ++j) s += static_cast<double>(q[r][j]) * u[j];
    out[r] = s;
  }
}

SSLOPS_AVX2 inline void axpy4_fd_avx2(const double w[4], const float* const q[4], double* acc, int64_t n) {
  const __m256d w0 = _mm256_set1_pd(w[0]), w1 = _mm256_set1_pd(w[1]), w2 = _mm256_set1_pd(w[2]),
                w3 = _mm256_set1_pd(w[3]);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    __m256d a = _mm256_loadu_pd(acc + i);
    a = _mm256_fmadd_pd(w0, _mm256_cvtps_pd(_mm_loadu_ps(q[0] + i)), a);
    a = _mm256_fmadd_pd(w1, _mm256_cvtps_pd(_mm_loadu_ps(q[1] + i)), a);
    a = _mm256_fmadd_pd(w2, _mm256_cvtps_pd(_mm_loadu_ps(q[2] + i)), a);
    a = _mm256_fmadd_pd(w3, _mm256_cvtps_pd(_mm_loadu_ps(q[3] + i)), a);
    _mm256_storeu_pd(acc + i, a);
  }
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) acc[i] += w[r] * q[r][i];
}

// q[i] <- q[i] * u[i] * w, computed in float64 and rounded once
SSLOPS_AVX2 inline void scale_fd_avx2(float* q, const double* u, double w, int64_t n) {
  const __m256d wv = _mm256_set1_pd(w);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d p = _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(q + i)), _mm256_loadu_pd(u + i)), wv);
    _mm_storeu_ps(q + i, _mm256_cvtpd_ps(p));
  }
  for (; i < n; ++i) q[i] = static_cast<float>(q[i] * u[i] * w);
}

// sum_i exp(x[i] - shift), exps in float32, the sum in float64
SSLOPS_AVX2 inline double sum_exp_avx2(const float* x, float shift, int64_t n) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 y = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(y)));
    a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1)));
  }
  double s = hsum256d(_mm256_add_pd(a0, a1));
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

SSLOPS_AVX2 inline void exp_inplace_avx2(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

SSLOPS_AVX2 inline float max_avx2(const float* x, int64_t n, float init) {
  __m256 m = _mm256_set1_ps(init);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  float r = hmax256(m);
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}
#endif

inline double dot_fd_scalar(const float* q, const double* u, int64_t n) {
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

inline double dot_fd(const float* q, const double* u, int64_t n) {
#if SSLOPS_X86
  if (have_avx2()) return dot_fd_avx2(q, u, n);
#endif
  return dot_fd_scalar(q, u, n);
}

inline void axpy_fd(double w, const float* q, double* acc, int64_t n) {
#if SSLOPS_X86
  if (have_avx2()) return axpy_fd_avx2(w, q, acc, n);
#endif
  for (int64_t i = 0; i < n; ++i) acc[i] += w * q[i];
}

inline void scale_fd(float* q, const double* u, double w, int64_t n) {
#if SSLOPS_X86
  if (have_avx2()) return scale_fd_avx2(q, u, w, n);
#endif
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(q[i] * u[i] * w);
}

template <typename T>
inline double sum_exp(const T* x, T shift, int64_t n) {
#if SSLOPS_X86
  if constexpr (std::is_same<T, float>::value)
    if (have_avx2()) return sum_exp_avx2(x, shift, n);
#endif
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

template <typename T>
inline void exp_inplace(T* x, int64_t n) {
#if SSLOPS_X86
  if constexpr (std::is_same<T, float>::value)
    if (have_avx2()) return exp_inplace_avx2(x, n);
#endif
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename T>
inline T max_of(const T* x, int64_t n, T init) {
#if SSLOPS_X86
  if constexpr (std::is_same<T, float>::value)
    if (have_avx2()) return max_avx2(x, n, init);
#endif
  for (int64_t i = 0; i < n; ++i) init = x[i] > init ? x[i] : init;
  return init;
}

}  // namespace simd
}  // namespace sslops
