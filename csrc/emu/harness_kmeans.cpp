// k-means kernels (csrc/kernels/kmeans.cuh) on the emulator.
#include <algorithm>
#include <numeric>
#include <vector>

#include "harness.h"
#include "../kernels/kmeans.cuh"

extern "C" {

int emu_kmeans_assign(const float* x, const float* c, const float* half_sq, int64_t N, int64_t K, int64_t D, int tf32,
                      float* best_score, int64_t* best, int64_t max_shared, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    sslops::kmeans::assign(x, c, half_sq, N, K, D, tf32 != 0, best_score, best, static_cast<size_t>(max_shared),
                           nullptr);
  });
}

int64_t emu_kmeans_max_pieces(int64_t N, int64_t K) { return sslops::kmeans::max_pieces(N, K); }

// The host side of the update as csrc/kmeans_cuda.cu does it with ATen (a stable sort of the
// row indices by assignment, the cluster offsets, the piece offsets), then the kernels.
int emu_kmeans_update(const float* x, const int64_t* assign, int64_t N, int64_t K, int64_t D, float* sums,
                      float* counts, double* partial, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    std::vector<int64_t> order(N), offsets(K + 1, 0), piece_offsets(K + 1, 0);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return assign[a] < assign[b]; });
    for (int64_t i = 0; i < N; ++i) ++offsets[assign[i] + 1];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t count = offsets[k + 1];
      offsets[k + 1] = offsets[k] + count;
      piece_offsets[k + 1] = piece_offsets[k] + sslops::dev::ceil_div(count, sslops::kmeans::kPieceRows);
    }
    sslops::kmeans::update(x, order.data(), offsets.data(), piece_offsets.data(), N, K, D, partial, sums, counts,
                           nullptr);
  });
}

}  // extern "C"
