// k-means kernels: the assignment as one GEMM + running arg-max (no score matrix), and a
// deterministic update (fixed-order sums in float64).
//
// Assignment. A block owns kRows rows of x and keeps them in shared memory (all of D when it
// fits, else kChunk dimensions at a time); it streams the centroids through shared memory in
// tiles of kCols x kChunk, computes the kRows x kCols scores of each tile (fp32 FMA, or TF32
// tensor cores when the caller asks for it: an argument, not a global flag), writes them to
// shared memory only, and folds them into a running arg-max per row (ties: the lower index).
// score = x.c (spherical) or x.c - |c|^2/2 (argmax of that = argmin |x - c|^2). With TF32
// the winner's score is recomputed exactly in fp32 (the arg-max is TF32's).
//
// Update. The caller sorts the row indices stably by assignment (order), and passes the
// cluster offsets into that order and the offsets of each cluster's pieces of at most
// kPieceRows rows. One block sums one piece, row after row in float64; a second kernel adds
// each cluster's pieces in order. No atomics: the result does not depend on scheduling.
#pragma once
#include "compat.cuh"

namespace sslops {
namespace kmeans {

constexpr int kThreads = 256;  // 8 warps
constexpr int kRows = 128;     // rows of x per block
constexpr int kCols = 64;      // centroids per tile
constexpr int kChunk = 32;     // dimensions per step
constexpr int kPad = 4;        // row padding of the shared tiles (floats): banks, and wmma's ldm % 4 == 0
constexpr int kScoreLd = kCols + kPad;
constexpr int kPieceRows = 256;

struct AssignPlan {
  int64_t blocks;
  bool resident;  // all D dimensions of the block's rows stay in shared memory
  int64_t x_ld;   // row stride of the x tile in shared memory (floats)
  size_t shared;  // bytes
};

inline int64_t round_up(int64_t a, int64_t b) { return dev::ceil_div(a, b) * b; }

inline AssignPlan assign_plan(int64_t N, int64_t D, size_t max_shared) {
  AssignPlan p;
  p.blocks = dev::ceil_div(N, kRows);
  const size_t fixed = (static_cast<size_t>(kCols) * (kChunk + kPad) + static_cast<size_t>(kRows) * kScoreLd) * sizeof(float);
  const int64_t full_ld = round_up(D > 0 ? D : 1, kChunk) + kPad;
  p.resident = fixed + static_cast<size_t>(kRows) * full_ld * sizeof(float) <= max_shared;
  p.x_ld = p.resident ? full_ld : kChunk + kPad;
  p.shared = fixed + static_cast<size_t>(kRows) * p.x_ld * sizeof(float);
  return p;
}

// x rows [r0, r0 + kRows) x dims [d0, d0 + width) -> xs (zeros outside x)
__device__ __forceinline__ void load_rows(const float* __restrict__ x, int64_t N, int64_t D, int64_t r0, int64_t d0,
                                          int64_t width, float* xs, int64_t ld) {
  for (int64_t i = threadIdx.x; i < kRows * width; i += blockDim.x) {
    const int64_t r = i / width, d = i - r * width;
    const int64_t row = r0 + r, dim = d0 + d;
    xs[r * ld + d] = (row < N && dim < D) ? x[row * D + dim] : 0.f;
  }
}

// kCols x kChunk tile of centroids [c0, ...) x [d0, ...) -> cs (zeros outside c)
__device__ __forceinline__ void load_centroids(const float* __restrict__ c, int64_t K, int64_t D, int64_t c0, int64_t d0,
                                               float* cs) {
  for (int i = threadIdx.x; i < kCols * kChunk; i += blockDim.x) {
    const int j = i / kChunk, d = i - j * kChunk;
    const int64_t col = c0 + j, dim = d0 + d;
    cs[j * (kChunk + kPad) + d] = (col < K && dim < D) ? c[col * D + dim] : 0.f;
  }
}

// sc[r][j] += sum_d xs[r][d] cs[j][d] over one chunk; fp32 FMA, each thread an 8 x 4 block of the tile
__device__ __forceinline__ void tile_fma(const float* xs, int64_t x_ld, const float* cs, float* sc) {
  const int r0 = (threadIdx.x / 16) * 8, j0 = (threadIdx.x % 16) * 4;
  float acc[8][4];
  for (int a = 0; a < 8; ++a)
    for (int b = 0; b < 4; ++b) acc[a][b] = sc[(r0 + a) * kScoreLd + j0 + b];
  for (int d = 0; d < kChunk; ++d) {
    float cv[4];
    for (int b = 0; b < 4; ++b) cv[b] = cs[(j0 + b) * (kChunk + kPad) + d];
    for (int a = 0; a < 8; ++a) {
      const float xv = xs[(r0 + a) * x_ld + d];
      for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(xv, cv[b], acc[a][b]);
    }
  }
  for (int a = 0; a < 8; ++a)
    for (int b = 0; b < 4; ++b) sc[(r0 + a) * kScoreLd + j0 + b] = acc[a][b];
}

// the same with TF32 tensor cores: warp w owns rows [16 w, 16 w + 16) of the tile, all kCols columns
__device__ __forceinline__ void tile_tf32(const float* xs, int64_t x_ld, const float* cs, float* sc) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[kCols / 16];
  for (int t = 0; t < kCols / 16; ++t)
    wmma::load_matrix_sync(acc[t], sc + warp * 16 * kScoreLd + t * 16, kScoreLd, wmma::mem_row_major);
  for (int k = 0; k < kChunk; k += 8) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::load_matrix_sync(a, xs + warp * 16 * x_ld + k, static_cast<unsigned>(x_ld));
    for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
    for (int t = 0; t < kCols / 16; ++t) {
      // centroid j, dimension d at cs[j * ld + d]: the k x n operand B[d][j] is column-major
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
      wmma::load_matrix_sync(b, cs + t * 16 * (kChunk + kPad) + k, kChunk + kPad);
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
      wmma::mma_sync(acc[t], a, b, acc[t]);
    }
  }
  for (int t = 0; t < kCols / 16; ++t)
    wmma::store_matrix_sync(sc + warp * 16 * kScoreLd + t * 16, acc[t], kScoreLd, wmma::mem_row_major);
}

__device__ __forceinline__ bool better(float s, int64_t j, float best, int64_t best_j) {
  return s > best || (s == best && j < best_j);
}

template <bool kTF32>
__global__ void __launch_bounds__(kThreads) assign_kernel(const float* __restrict__ x, const float* __restrict__ c,
                                                          const float* __restrict__ half_sq, int64_t N, int64_t K,
                                                          int64_t D, bool resident, int64_t x_ld,
                                                          float* __restrict__ best_score, int64_t* __restrict__ best) {
  SSL_DYN_SHARED(smem);
  float* sc = reinterpret_cast<float*>(smem);       // [kRows][kScoreLd] scores of the tile
  float* cs = sc + kRows * kScoreLd;                 // [kCols][kChunk + kPad] centroids
  float* xs = cs + kCols * (kChunk + kPad);          // [kRows][x_ld] rows of x
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  // 2 threads per row for the arg-max: row = tid / 2, half = tid % 2 (columns half, half + 2, ...)
  const int my_row = threadIdx.x / 2, half = threadIdx.x % 2;
  constexpr int64_t kNone = INT64_MAX;  // no column seen yet
  float run_best = -INFINITY;
  int64_t run_j = kNone;
  if (resident) load_rows(x, N, D, r0, 0, x_ld - kPad, xs, x_ld);
  for (int64_t c0 = 0; c0 < K; c0 += kCols) {
    for (int i = threadIdx.x; i < kRows * kScoreLd; i += blockDim.x) sc[i] = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
      __syncthreads();  // the previous chunk's tiles are consumed (and sc is zeroed, x is loaded)
      load_centroids(c, K, D, c0, d0, cs);
      if (!resident) load_rows(x, N, D, r0, d0, kChunk, xs, x_ld);
      __syncthreads();
      const float* xd = resident ? xs + d0 : xs;
      if (kTF32)
        tile_tf32(xd, x_ld, cs, sc);
      else
        tile_fma(xd, x_ld, cs, sc);
    }
    __syncthreads();  // every score of the tile is in sc
    float b = -INFINITY;
    int64_t bj = kNone;
    for (int j = half; j < kCols && c0 + j < K; j += 2) {
      const int64_t col = c0 + j;
      const float s = sc[my_row * kScoreLd + j] - (half_sq != nullptr ? half_sq[col] : 0.f);
      if (bj == kNone || better(s, col, b, bj)) {
        b = s;
        bj = col;
      }
    }
    const float ob = __shfl_xor_sync(0xffffffffu, b, 1);
    const int64_t oj = __shfl_xor_sync(0xffffffffu, bj, 1);
    if (oj != kNone && (bj == kNone || better(ob, oj, b, bj))) {
      b = ob;
      bj = oj;
    }
    if (run_j == kNone || better(b, bj, run_best, run_j)) {
      run_best = b;
      run_j = bj;
    }
    __syncthreads();  // sc is read before the next tile zeroes it
  }
  const int64_t row = r0 + my_row;
  if (half != 0 || row >= N) return;
  if (kTF32) {  // the winner's score in fp32
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s = fmaf(x[row * D + d], c[run_j * D + d], s);
    run_best = s - (half_sq != nullptr ? half_sq[run_j] : 0.f);
  }
  best_score[row] = run_best;
  best[row] = run_j;
}

// one block per piece of at most kPieceRows rows of one cluster: partial[p][d] = sum of x[order[i]][d]
__global__ void __launch_bounds__(128) piece_sum_kernel(const float* __restrict__ x, const int64_t* __restrict__ order,
                                                        const int64_t* __restrict__ offsets,
                                                        const int64_t* __restrict__ piece_offsets, int64_t K,
                                                        int64_t D, double* __restrict__ partial) {
  const int64_t p = blockIdx.x;
  if (p >= piece_offsets[K]) return;
  int64_t lo = 0, hi = K;  // the cluster k with piece_offsets[k] <= p < piece_offsets[k + 1]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (piece_offsets[mid] <= p) lo = mid; else hi = mid;
  }
  const int64_t k = lo;
  const int64_t begin = offsets[k] + (p - piece_offsets[k]) * kPieceRows;
  const int64_t end = begin + kPieceRows < offsets[k + 1] ? begin + kPieceRows : offsets[k + 1];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(x[order[i] * D + d]);
    partial[p * D + d] = acc;
  }
}

// sums[k][d] = the cluster's pieces added in order; counts[k]
__global__ void cluster_sum_kernel(const double* __restrict__ partial, const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ piece_offsets, int64_t D,
                                   float* __restrict__ sums, float* __restrict__ counts) {
  const int64_t k = blockIdx.x;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    double acc = 0.0;
    for (int64_t p = piece_offsets[k]; p < piece_offsets[k + 1]; ++p) acc += partial[p * D + d];
    sums[k * D + d] = static_cast<float>(acc);
  }
  if (threadIdx.x == 0) counts[k] = static_cast<float>(offsets[k + 1] - offsets[k]);
}

// ---- launchers (raw pointers; the caller allocates the outputs)

// half_sq: |c_k|^2 / 2 (Euclidean) or nullptr (spherical)
inline void assign(const float* x, const float* c, const float* half_sq, int64_t N, int64_t K, int64_t D, bool tf32,
                   float* best_score, int64_t* best, size_t max_shared, cudaStream_t stream) {
  const AssignPlan p = assign_plan(N, D, max_shared);
  if (p.blocks == 0) return;
  if (tf32) {
    ssl_allow_shared(assign_kernel<true>, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads), p.shared, stream, assign_kernel<true>)(
        x, c, half_sq, N, K, D, p.resident, p.x_ld, best_score, best);
  } else {
    ssl_allow_shared(assign_kernel<false>, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(p.blocks)), dim3(kThreads), p.shared, stream, assign_kernel<false>)(
        x, c, half_sq, N, K, D, p.resident, p.x_ld, best_score, best);
  }
}

// the most pieces N rows in K clusters can make (the partial buffer holds that many rows of D doubles)
inline int64_t max_pieces(int64_t N, int64_t K) { return dev::ceil_div(N, kPieceRows) + K; }

// order: row indices sorted stably by assignment; offsets [K + 1]: cluster k's rows are order[offsets[k],
// offsets[k + 1]); piece_offsets [K + 1]: exclusive scan of ceil(count_k / kPieceRows)
inline void update(const float* x, const int64_t* order, const int64_t* offsets, const int64_t* piece_offsets,
                   int64_t N, int64_t K, int64_t D, double* partial, float* sums, float* counts, cudaStream_t stream) {
  const int64_t pieces = max_pieces(N, K);
  if (pieces > 0 && D > 0)
    SSL_LAUNCH(dim3(static_cast<unsigned>(pieces)), dim3(128), 0, stream, piece_sum_kernel)(
        x, order, offsets, piece_offsets, K, D, partial);
  SSL_LAUNCH(dim3(static_cast<unsigned>(K)), dim3(128), 0, stream, cluster_sum_kernel)(
      partial, offsets, piece_offsets, D, sums, counts);
}

}  // namespace kmeans
}  // namespace sslops
