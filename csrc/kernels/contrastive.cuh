// Fused contrastive (InfoNCE / NT-Xent) loss, flash-attention style: the semantics of
// csrc/contrastive.cpp (see there), with every logits tile kept on chip.
//
// A block of 128 threads (4 warps) owns a tile of kBQ = 64 query rows (forward, dq) or kBK = 64
// keys (dk) and loops over the other side's tiles. D goes through shared memory in panels of
// whole chunks of kDK = 32 columns, zero-filled past D, so any D works. When both tiles fit
// whole (one panel holds all of D, the plan's first choice: at D = 128 in 16 bits every kernel's
// does), the block's own tile is loaded once and stays, and each tile of the other side is
// loaded once and serves both the logits GEMM and the backward's product GEMM: the blocks pull
// 64 x D elements from L2 per tile pair. Otherwise both sides stream through 32-column panels,
// for the logits and again for the products (3 x 64 x D per tile pair in backward). Both plans
// sum in the same order and give the same bits. The logits tile S = Q K^T is computed by a SIMT
// fp32 FMA GEMM for float inputs (exact fp32 products, no TF32) or by wmma 16x16x16 with fp32
// accumulators for fp16 / bf16, and lands in shared memory as fp32; warp w owns rows 16w..16w+15
// there, two threads per row (even / odd columns), so the row pass needs no block barrier.
//
//   forward: a running max m and sum l per row and thread (online log-sum-exp) over the key
//            tiles, the self column left out and the positive logit picked in the same pass;
//            the row's two threads merge (m, l) at the end. Writes loss and lse.
//   dq:      per query tile, over the key tiles: recompute S, dS = g (exp(S/T - lse) - [j = pos])
//            (0 at self), dq += dS K.
//   dk:      per key tile, over the query tiles: recompute S and dS, dk += dS^T Q.
//   dz:      keys is queries (SimCLR on one process, contrastive_loss(z, z, ...)): the dq kernel
//            with H = dS + dS^T in place of dS, so dz = dq + dk = H Z / T in one pass. The tile of
//            keys [k0, k0 + 64) are queries too; their g, lse, positive and self column are staged
//            in shared memory, and H_ij = g_i (p_ij - [j = pos_i]) + g_j (p_ji - [i = pos_j]) (each
//            term 0 at its self column) comes from the one logits tile, since S_ji = S_ij. Half the
//            backward work of dq + dk (two GEMMs per tile pair, not four), one launch, no atomics.
//            The forward gains nothing from symmetry here: using S_ij for row j's log-sum-exp too
//            would need a reduction across blocks (atomics, or per-tile partials: O(N^2 / 64)
//            memory), so it stays one pass over every tile pair.
// Few query tiles (MoCo's 4096 queries are 64 tiles; a rank's share of a SimCLR batch fewer
// still) would leave most SMs idle, so the forward and dq / dz kernels split the key tiles among
// S blocks per query tile (grid.y, split_count: about two blocks per SM in all, at least two key
// tiles per block). Each block writes its rows' partial (max, sum, positive logit) or partial dq
// to a workspace, and a second kernel adds the S partials in order: S x N x 3 or S x N x D
// floats, where S x N is under 256 x the SM count (33,792 rows on an H100), whatever N.
// Every output row belongs to one block and is summed in a fixed order: no atomics, and the
// result does not depend on scheduling. dq and dk accumulate in fp32, in shared memory when the
// block's 64 x D floats fit (make_plan), else in place in the output rows. Extra global
// memory: none.
//
// dS for the tensor cores: cast to T. Its entries are at most |g_i| and mostly far smaller (MoCo:
// mean over 4096 rows and 65536 keys, g = 2.4e-4, dS_ij = g p_ij averages g / 65536 = 4e-9, below
// fp16's smallest subnormal 6e-8), so each query tile's dS is multiplied by a power of two chosen
// from the tile's max |g| (max |g| * scale in [2^13, 2^14), so |dS| * scale <= 2^14 fits fp16;
// dz's H = dS + dS^T, with the max over the tile's rows and columns, stays under 2^15) and the
// products are multiplied by 1/scale in fp32, which is exact. bf16 has fp32's range and takes the same path;
// fp32 inputs use scale 1.
#pragma once
#include <type_traits>

#include "compat.cuh"

namespace sslops {
namespace contrastive {

constexpr int kBQ = 64;        // query rows per tile
constexpr int kBK = 64;        // keys per tile
constexpr int kDK = 32;        // columns of D per pass through shared memory (one per lane)
constexpr int kThreads = 128;  // 4 warps of 16 tile rows; two threads per row in the row passes
// __launch_bounds__'s blocks per SM: caps registers at 128, under which ptxas spills nothing (without
// it ptxas gives the forward kernels 72-80 registers and spills 28 bytes; sm_90, CUDA 13.0)
constexpr int kMinBlocks = 4;
// A block uses at most this much shared memory (two blocks, 8 warps, per H100 SM); the plan picks
// the first layout that fits: whole tiles with the dq / dk accumulators in shared memory, streamed
// panels with them, streamed panels with the accumulators in the output rows.
constexpr size_t kSharedCap = 100 * 1024;

constexpr int kMaxSplits = 64;    // blocks per query tile over the key tiles (grid.y)
constexpr int kMinSplitTiles = 2;  // key tiles per block at least, when split

static_assert(kBQ == kBK && kBQ == kThreads / 2, "tile rows: 16 per warp, two threads per row");
static_assert(kDK == 32, "the product pass gives each lane one column of a chunk");

template <typename T>
struct Cfg {
  static constexpr bool kWmma = !std::is_same<T, float>::value;
  // leading dimensions (elements) of the shared tiles: wmma needs multiples of 16 bytes; the pads
  // spread a tile's rows over the banks (fp32: every access of the SIMT path is conflict-free;
  // 16-bit: the row pass reads S with 2-way conflicts)
  static constexpr int kPad = kWmma ? 8 : 1;              // Q / K panels [64][panel + kPad], T
  static constexpr int kLdS = kWmma ? kBK + 4 : kBK + 2;   // logits [64][kBK], fp32
  static constexpr int kLdG = kBK + 8;                      // dS [64][kBK] as T (wmma only)
};

__host__ __device__ constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }

// What the dz kernel needs about the keys of its current tile, as queries of their own
struct Col {
  float g, lse;
  int64_t pos, self;  // self = -1 when there is none
};

// Dynamic shared memory: [Q panel][K panel][S fp32][dS as T (backward, wmma)][Col x 64 (dz)][accumulator 64 x D]
template <typename T>
__host__ __device__ constexpr size_t in_bytes(int64_t panel) {
  return round_up(sizeof(T) * 64 * static_cast<size_t>(panel + Cfg<T>::kPad));
}
template <typename T>
__host__ __device__ constexpr size_t s_bytes() {
  return round_up(sizeof(float) * 64 * Cfg<T>::kLdS);
}
template <typename T>
__host__ __device__ constexpr size_t g_bytes(bool backward) {
  return backward && Cfg<T>::kWmma ? round_up(sizeof(T) * 64 * Cfg<T>::kLdG) : 0;
}
__host__ __device__ constexpr size_t col_bytes(bool sym) { return sym ? round_up(sizeof(Col) * kBK) : 0; }
template <typename T>
__host__ __device__ inline size_t shared_bytes(int64_t panel, bool backward, int64_t acc_cols, bool sym = false) {
  return 2 * in_bytes<T>(panel) + s_bytes<T>() + g_bytes<T>(backward) + col_bytes(sym) +
         round_up(sizeof(float) * 64 * static_cast<size_t>(acc_cols));
}

template <typename T>
struct Layout {
  int64_t panel;  // columns of D per panel (a multiple of kDK)
  int ld;         // the panels' leading dimension, panel + kPad
  T* qs;       // query rows x panel columns of D
  T* ks;       // key rows x panel columns of D
  float* s;    // the logits tile (fp32: then dS in place; wmma: then the products' scratch)
  T* g;        // dS * scale as T (wmma)
  Col* cols;   // the current key tile's rows as queries (dz)
  float* acc;  // the dq / dk accumulator [64][D], when in shared memory
};

template <typename T>
__device__ __forceinline__ Layout<T> layout(unsigned char* smem, int64_t panel, bool backward, bool sym = false) {
  Layout<T> l;
  const size_t in = in_bytes<T>(panel), g_at = 2 * in + s_bytes<T>(), cols_at = g_at + g_bytes<T>(backward);
  l.panel = panel;
  l.ld = static_cast<int>(panel) + Cfg<T>::kPad;
  l.qs = reinterpret_cast<T*>(smem);
  l.ks = reinterpret_cast<T*>(smem + in);
  l.s = reinterpret_cast<float*>(smem + 2 * in);
  l.g = reinterpret_cast<T*>(smem + g_at);
  l.cols = reinterpret_cast<Col*>(smem + cols_at);
  l.acc = reinterpret_cast<float*>(smem + cols_at + col_bytes(sym));
  return l;
}

// The columns of the panel starting at d0 that the GEMMs visit: whole chunks up to D's last one
template <typename T>
__device__ __forceinline__ int panel_width(const Layout<T>& sm, int64_t D, int64_t d0) {
  const int64_t left = dev::ceil_div(D - d0, kDK) * kDK;
  return static_cast<int>(left < sm.panel ? left : sm.panel);
}

// rows [row0, row0 + 64) x the panel's columns [d0, d0 + width) of src [rows, D] into dst [64][ld];
// zeros outside src, so padding rows and columns add nothing to the GEMMs. When every row of src
// starts 16-byte aligned (D a multiple of 16 bytes, src aligned), 16 bytes per load (and per
// store for 16-bit T, whose panel rows are 16-byte aligned too: ld * 2 = 2 panel + 16 bytes).
template <typename T>
__device__ __forceinline__ void load_panel(const Layout<T>& sm, T* dst, const T* __restrict__ src, int64_t row0,
                                           int64_t rows, int64_t D, int64_t d0) {
  const int width = panel_width(sm, D, d0);
  constexpr int kVec = 16 / sizeof(T);  // width is a multiple of kDK, so of kVec
  if (D % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    const int vecs = width / kVec;
    for (int e = threadIdx.x; e < 64 * vecs; e += kThreads) {
      const int r = e / vecs, c = e % vecs * kVec;
      const int64_t row = row0 + r, col = d0 + c;
      const dev::Bytes16 v = row < rows && col < D ? dev::load16(src + row * D + col) : dev::Bytes16{};
      T* out = dst + r * sm.ld + c;
      if constexpr (Cfg<T>::kWmma) {
        dev::store16(out, v);
      } else {
        T t[kVec];
        memcpy(t, &v, 16);
#pragma unroll
        for (int i = 0; i < kVec; ++i) out[i] = t[i];
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < 64 * width; e += kThreads) {
    const int r = e / width, c = e % width;
    const int64_t row = row0 + r, col = d0 + c;
    dst[r * sm.ld + c] = row < rows && col < D ? src[row * D + col] : dev::from_float<T>(0.f);
  }
}

// The panels of Q and K starting at column d0 for the logits GEMM (each side loaded unless its whole
// tile is already there); returns their width. Called by every thread.
template <typename T>
__device__ __forceinline__ int logits_panel(const Layout<T>& sm, const T* __restrict__ q, int64_t q0, int64_t N,
                                            bool load_q, const T* __restrict__ k, int64_t k0, int64_t M, bool load_k,
                                            int64_t D, int64_t d0) {
  __syncthreads();  // every warp is done with the previous panels (and the previous tile's dS and products)
  if (load_q) load_panel(sm, sm.qs, q, q0, N, D, d0);
  if (load_k) load_panel(sm, sm.ks, k, k0, M, D, d0);
  __syncthreads();
  return panel_width(sm, D, d0);
}

// S (not yet divided by T) = rows q0.. of q times rows k0.. of k, transposed, into sm.s; warp w
// writes rows 16w..16w+15. D goes through the panels; a side whose whole tile the block loaded
// once (load_q / load_k false: one panel holds all of D) is not reloaded. Starts with a block
// barrier whenever D > 0.
template <typename T>
__device__ void logits_tile(const Layout<T>& sm, const T* __restrict__ q, int64_t q0, int64_t N, bool load_q,
                            const T* __restrict__ k, int64_t k0, int64_t M, bool load_k, int64_t D) {
  constexpr int lds = Cfg<T>::kLdS;
  const int ld = sm.ld;
  if constexpr (Cfg<T>::kWmma) {
    using namespace nvcuda;
    const int w = threadIdx.x >> 5;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBK / 16];
#pragma unroll
    for (int n = 0; n < kBK / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
    for (int64_t d0 = 0; d0 < D; d0 += sm.panel) {
      const int width = logits_panel(sm, q, q0, N, load_q, k, k0, M, load_k, D, d0);
      for (int kk = 0; kk < width; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, sm.qs + 16 * w * ld + kk, ld);
#pragma unroll
        for (int n = 0; n < kBK / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T: column j is key j
          wmma::load_matrix_sync(b, sm.ks + 16 * n * ld + kk, ld);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
    }
    __syncwarp();  // the warp's lanes are done reading its rows of S (D == 0 has no barrier above)
#pragma unroll
    for (int n = 0; n < kBK / 16; ++n)
      wmma::store_matrix_sync(sm.s + 16 * w * lds + 16 * n, acc[n], lds, wmma::mem_row_major);
  } else {
    const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;  // rows 4ty..4ty+3, columns tx + 8j
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < D; d0 += sm.panel) {
      const int width = logits_panel(sm, q, q0, N, load_q, k, k0, M, load_k, D, d0);
#pragma unroll 4
      for (int d = 0; d < width; ++d) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sm.qs[(4 * ty + i) * ld + d];
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = sm.ks[(tx + 8 * j) * ld + d];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncwarp();  // as above
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) sm.s[(4 * ty + i) * lds + tx + 8 * j] = acc[i][j];
  }
  __syncwarp();  // the warp's rows of S are complete before its row pass reads them
}

// What the two threads of tile row r need about their query.
struct Row {
  bool valid;          // a row of the input (not padding)
  int64_t pos, self;   // self = -1 when there is none
  float g, lse;        // backward only
};

__device__ __forceinline__ Row load_row(int64_t i, int64_t N, const int64_t* __restrict__ pos,
                                        const int64_t* __restrict__ self, const float* __restrict__ lse,
                                        const float* __restrict__ g) {
  Row row{i < N, -1, -1, 0.f, 0.f};
  if (row.valid) {
    row.pos = pos[i];
    row.self = self != nullptr ? self[i] : -1;
    if (g != nullptr) row.g = g[i], row.lse = lse[i];
  }
  return row;
}

// key index j's column in the tile of keys [k0, k0 + cols), or -1
__device__ __forceinline__ int tile_column(int64_t j, int64_t k0, int cols) {
  return j >= k0 && j < k0 + cols ? static_cast<int>(j - k0) : -1;
}

// The power of two that dS of query rows [i0, i0 + rows) is multiplied by before the cast to T
// (see the top of the file), from the max |g| over those rows and, for dz, over the tile's keys
// [j0, j0 + cols) as queries; 1 for float. Warp collective: every lane of every warp calls it.
template <typename T>
__device__ float grad_scale(const float* __restrict__ g, int64_t i0, int rows, int64_t j0 = 0, int cols = 0) {
  if constexpr (!Cfg<T>::kWmma) {
    return 1.f;
  } else {
    float mx = 0.f;
    for (int r = threadIdx.x & 31; r < rows; r += 32) mx = fmaxf(mx, fabsf(g[i0 + r]));
    for (int c = threadIdx.x & 31; c < cols; c += 32) mx = fmaxf(mx, fabsf(g[j0 + c]));
    mx = dev::warp_max(mx);
    if (!(mx > 0.f) || !isfinite(mx)) return 1.f;
    int e;
    frexpf(mx, &e);  // mx = f 2^e, f in [0.5, 1), so mx 2^(14 - e) is in [2^13, 2^14)
    e = 14 - e;
    e = e > 100 ? 100 : (e < -100 ? -100 : e);  // scale and 1/scale stay normal floats
    return ldexpf(1.f, e);
  }
}

// dS * scale for this thread's half of tile row r (columns h, h + 2, ...): in place over S for
// float, into sm.g as T for the tensor cores; 0 in padding rows and columns
template <typename T>
__device__ __forceinline__ void grad_tile(const Layout<T>& sm, const Row& row, int r, int h, int64_t k0, int cols,
                                          float inv_t, float scale) {
  float* srow = sm.s + r * Cfg<T>::kLdS;
  const float gs = row.g * scale;
  const int sc = tile_column(row.self, k0, cols), pc = tile_column(row.pos, k0, cols);
  for (int c = h; c < kBK; c += 2) {
    float v = 0.f;
    if (row.valid && c < cols) {
      float p = c == sc ? 0.f : expf(srow[c] * inv_t - row.lse);
      if (c == pc) p -= 1.f;
      v = gs * p;
    }
    if constexpr (Cfg<T>::kWmma)
      sm.g[r * Cfg<T>::kLdG + c] = dev::from_float<T>(v);
    else
      srow[c] = v;
  }
}

// The keys [k0, k0 + cols) of the dz kernel's tile as queries, into sm.cols. Written at the top of
// a tile's iteration: every thread is past the previous tile's sym_grad_tile (add_products starts
// with a block barrier), and logits_tile's first barrier (D > 0 in backward) publishes them.
template <typename T>
__device__ __forceinline__ void stage_columns(const Layout<T>& sm, int64_t k0, int cols,
                                              const int64_t* __restrict__ pos, const int64_t* __restrict__ self,
                                              const float* __restrict__ lse, const float* __restrict__ g) {
  for (int c = threadIdx.x; c < cols; c += kThreads) {
    const int64_t j = k0 + c;
    sm.cols[c] = Col{g[j], lse[j], pos[j], self != nullptr ? self[j] : -1};
  }
}

// H * scale for this thread's half of tile row r (query i; columns h, h + 2, ...): dS_ij from
// row i's softmax plus dS_ji from row j's (the same logit, S_ji = S_ij), stored as grad_tile does
template <typename T>
__device__ __forceinline__ void sym_grad_tile(const Layout<T>& sm, const Row& row, int64_t i, int r, int h, int64_t k0,
                                              int cols, float inv_t, float scale) {
  float* srow = sm.s + r * Cfg<T>::kLdS;
  const int sc = tile_column(row.self, k0, cols), pc = tile_column(row.pos, k0, cols);
  for (int c = h; c < kBK; c += 2) {
    float v = 0.f;
    if (row.valid && c < cols) {
      const float x = srow[c] * inv_t;
      const Col col = sm.cols[c];
      float p = c == sc ? 0.f : expf(x - row.lse);
      if (c == pc) p -= 1.f;
      float pt = col.self == i ? 0.f : expf(x - col.lse);
      if (col.pos == i) pt -= 1.f;
      v = (row.g * p + col.g * pt) * scale;
    }
    if constexpr (Cfg<T>::kWmma)
      sm.g[r * Cfg<T>::kLdG + c] = dev::from_float<T>(v);
    else
      srow[c] = v;
  }
}

// The accumulator rows of warp w (16w..16w+15 of the block's `rows`), lanes over the columns
__device__ __forceinline__ void zero_rows(float* acc, int rows, int64_t D) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * w + rr;
    if (r < rows)
      for (int64_t d = lane; d < D; d += 32) acc[r * D + d] = 0.f;
  }
}

__device__ __forceinline__ void store_rows(const float* acc, float* out, int rows, int64_t D, float inv_t) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * w + rr;
    if (r < rows)
      for (int64_t d = lane; d < D; d += 32) out[r * D + d] = acc[r * D + d] * inv_t;
  }
}

// The panel of X = rows x0.. of src starting at column d0, in x: loaded there when streaming
// (reload), else x holds it already. Returns its width. Called by every thread.
template <typename T>
__device__ __forceinline__ int product_panel(const Layout<T>& sm, T* x, const T* __restrict__ src, int64_t x0,
                                             int64_t x_rows, int64_t D, int64_t d0, bool reload) {
  if (reload) {
    if (d0 > 0) __syncthreads();  // every warp is done with the previous panel
    load_panel(sm, x, src, x0, x_rows, D, d0);
    __syncthreads();
  }
  return panel_width(sm, D, d0);
}

// acc[rows][D] += (1/scale) op(dS) X over every chunk of D, X = rows x0.. of src (keys for dq,
// queries for dk) in the panel x; op(dS) = dS (dq) or dS^T (dk, kTransposed). reload: stream X
// through x panel by panel (else x already holds all of X: the tile the logits GEMM just used).
// Warp w updates accumulator rows 16w..16w+15. Starts with a block barrier: dS is complete (dk
// reads every warp's rows of it) and the logits GEMM is done with the panels.
template <typename T, bool kTransposed>
__device__ void add_products(const Layout<T>& sm, T* x, const T* __restrict__ src, int64_t x0, int64_t x_rows,
                             int64_t D, bool reload, float* acc, int rows, float inv_scale) {
  const int ld = sm.ld;
  __syncthreads();
  if constexpr (Cfg<T>::kWmma) {
    using namespace nvcuda;
    using ALayout = typename std::conditional<kTransposed, wmma::col_major, wmma::row_major>::type;
    constexpr int ldg = Cfg<T>::kLdG, lds = Cfg<T>::kLdS;
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // this warp's 16 rows of op(dS), all kBK columns: loaded once for every chunk of D
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a[kBK / 16];
#pragma unroll
    for (int s = 0; s < kBK / 16; ++s)
      wmma::load_matrix_sync(a[s], kTransposed ? sm.g + 16 * s * ldg + 16 * w : sm.g + 16 * w * ldg + 16 * s, ldg);
    float* scratch = sm.s + 16 * w * lds;  // S is dead: its rows 16w.. hold this warp's products
    for (int64_t d0 = 0; d0 < D; d0 += sm.panel) {
      const int width = product_panel(sm, x, src, x0, x_rows, D, d0, reload);
      for (int c0 = 0; c0 < width; c0 += kDK) {  // the panel's chunks: columns d0 + c0 + lane
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> p[kDK / 16];
#pragma unroll
        for (int n = 0; n < kDK / 16; ++n) wmma::fill_fragment(p[n], 0.f);
#pragma unroll
        for (int s = 0; s < kBK / 16; ++s)
#pragma unroll
          for (int n = 0; n < kDK / 16; ++n) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
            wmma::load_matrix_sync(b, x + 16 * s * ld + c0 + 16 * n, ld);
            wmma::mma_sync(p[n], a[s], b, p[n]);
          }
#pragma unroll
        for (int n = 0; n < kDK / 16; ++n)
          wmma::store_matrix_sync(scratch + 16 * n, p[n], lds, wmma::mem_row_major);
        __syncwarp();  // the warp's products are in scratch
        const int64_t d = d0 + c0 + lane;
        if (d < D)
          for (int rr = 0; rr < 16; ++rr) {
            const int r = 16 * w + rr;
            if (r < rows) acc[r * D + d] += inv_scale * scratch[rr * lds + lane];
          }
        __syncwarp();  // scratch read before the next chunk's products overwrite it
      }
    }
  } else {
    constexpr int lds = Cfg<T>::kLdS;
    const int ty = threadIdx.x >> 3, tx = threadIdx.x & 7;  // rows 4ty..4ty+3, columns tx + 8j of a chunk
    for (int64_t d0 = 0; d0 < D; d0 += sm.panel) {
      const int width = product_panel(sm, x, src, x0, x_rows, D, d0, reload);
      for (int c0 = 0; c0 < width; c0 += kDK) {
        float p[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) p[i][j] = 0.f;
#pragma unroll 4
        for (int s = 0; s < kBK; ++s) {
          float a[4], b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = kTransposed ? sm.s[s * lds + 4 * ty + i] : sm.s[(4 * ty + i) * lds + s];
#pragma unroll
          for (int j = 0; j < 4; ++j) b[j] = x[s * ld + c0 + tx + 8 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) p[i][j] = fmaf(a[i], b[j], p[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = 4 * ty + i;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int64_t d = d0 + c0 + tx + 8 * j;
            if (r < rows && d < D) acc[r * D + d] += inv_scale * p[i][j];
          }
        }
      }
    }
  }
}

// The key tiles [t0, t1) of split s of S (as even as integers allow; S <= tiles)
__host__ __device__ __forceinline__ void split_tiles(int64_t tiles, int64_t S, int64_t s, int64_t* t0, int64_t* t1) {
  *t0 = tiles * s / S;
  *t1 = tiles * (s + 1) / S;
}

// The split whose tiles hold key tile t
__host__ __device__ __forceinline__ int64_t split_of(int64_t t, int64_t tiles, int64_t S) {
  int64_t s = 0;
  while (tiles * (s + 1) / S <= t) ++s;
  return s;
}

// ---- kernels: grid.x = query tiles (forward, dq) or key tiles (dk), grid.y = splits of the key tiles (forward,
// dq); kThreads threads; panel: the plan's
// (>= D: the block's own tile is loaded once, here, and published by logits_tile's first barrier)

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ pos,
                   const int64_t* __restrict__ self, int64_t N, int64_t M, int64_t D, float inv_t, int64_t panel,
                   int64_t splits, float* __restrict__ part, float* __restrict__ loss, float* __restrict__ lse) {
  SSL_DYN_SHARED(smem);
  const Layout<T> sm = layout<T>(smem, panel, false);
  const int64_t split = blockIdx.y;
  int64_t t0, t1;
  split_tiles(dev::ceil_div(M, kBK), splits, split, &t0, &t1);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const bool whole = D <= panel;
  if (whole) load_panel(sm, sm.qs, q, i0, N, D, 0);
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;  // tile row, and its even (0) or odd (1) columns
  const Row row = load_row(i0 + r, N, pos, self, nullptr, nullptr);
  float m = -INFINITY, l = 0.f, pl = 0.f;  // running max and sum over this thread's columns; positive logit
  for (int64_t k0 = t0 * kBK; k0 < M && k0 < t1 * kBK; k0 += kBK) {
    const int cols = M - k0 < kBK ? static_cast<int>(M - k0) : kBK;
    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);
    if (row.valid) {
      const float* srow = sm.s + r * Cfg<T>::kLdS;
      const int sc = tile_column(row.self, k0, cols), pc = tile_column(row.pos, k0, cols);
      float mx = -INFINITY;
      for (int c = h; c < cols; c += 2)
        if (c != sc) mx = fmaxf(mx, srow[c] * inv_t);
      if (mx > m) {  // from m = -inf: l is 0 and stays 0
        l *= expf(m - mx);
        m = mx;
      }
      if (m != -INFINITY)
        for (int c = h; c < cols; c += 2)
          if (c != sc) l += expf(srow[c] * inv_t - m);
      if (pc >= 0 && (pc & 1) == h) pl = srow[pc] * inv_t;
    }
  }
  // merge the row's two halves (lanes 2k and 2k + 1 of one warp)
  const float m2 = __shfl_xor_sync(0xffffffffu, m, 1);
  const float l2 = __shfl_xor_sync(0xffffffffu, l, 1);
  const float pl2 = __shfl_xor_sync(0xffffffffu, pl, 1);
  if (row.valid && h == 0) {
    const float mm = fmaxf(m, m2);
    float sum = 0.f;
    if (m != -INFINITY) sum += l * expf(m - mm);
    if (m2 != -INFINITY) sum += l2 * expf(m2 - mm);
    const float p = (row.pos & 1) == 0 ? pl : pl2;  // k0 is even: odd keys are the odd thread's
    if (splits == 1) {
      const float v = mm + logf(sum);
      lse[i0 + r] = v;
      loss[i0 + r] = v - p;
    } else {  // this split's partial: [max | sum at that max | positive logit (its split's only)] x [S][N]
      const int64_t at = split * N + i0 + r;
      part[at] = mm;
      part[splits * N + at] = sum;
      part[2 * splits * N + at] = p;
    }
  }
}

// loss and lse from the forward's S partials, added in split order
__global__ void __launch_bounds__(256)
    merge_forward_kernel(const float* __restrict__ part, const int64_t* __restrict__ pos, int64_t N, int64_t M,
                         int64_t splits, float* __restrict__ loss, float* __restrict__ lse) {
  const int64_t tiles = dev::ceil_div(M, kBK);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float mm = -INFINITY;
    for (int64_t s = 0; s < splits; ++s) mm = fmaxf(mm, part[s * N + i]);
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      const float ms = part[s * N + i];
      if (ms != -INFINITY) sum += part[(splits + s) * N + i] * expf(ms - mm);
    }
    const int64_t ps = split_of(pos[i] / kBK, tiles, splits);
    const float v = mm + logf(sum);
    lse[i] = v;
    loss[i] = v - part[(2 * splits + ps) * N + i];
  }
}

// kSym: the dz kernel (k is q, M == N; dq is dz)
template <typename T, bool kSym>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ pos,
              const int64_t* __restrict__ self, const float* __restrict__ lse, const float* __restrict__ g, int64_t N,
              int64_t M, int64_t D, float inv_t, int64_t panel, bool acc_in_shared, int64_t splits,
              float* __restrict__ part, float* __restrict__ dq) {
  SSL_DYN_SHARED(smem);
  const Layout<T> sm = layout<T>(smem, panel, true, kSym);
  const int64_t split = blockIdx.y;
  int64_t t0, t1;
  split_tiles(dev::ceil_div(M, kBK), splits, split, &t0, &t1);
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const bool whole = D <= panel;
  if (whole) load_panel(sm, sm.qs, q, i0, N, D, 0);
  const int rows = N - i0 < kBQ ? static_cast<int>(N - i0) : kBQ;
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
  const Row row = load_row(i0 + r, N, pos, self, lse, g);
  float scale = grad_scale<T>(g, i0, rows), inv_scale = 1.f / scale;
  // the block's rows of dq (split: of its partial) are its own
  float* out = splits == 1 ? dq + i0 * D : part + (split * N + i0) * D;
  float* acc = acc_in_shared ? sm.acc : out;
  zero_rows(acc, rows, D);
  __syncwarp();  // zeroed before the product passes (another lane mapping, same warp rows)
  for (int64_t k0 = t0 * kBK; k0 < M && k0 < t1 * kBK; k0 += kBK) {
    const int cols = M - k0 < kBK ? static_cast<int>(M - k0) : kBK;
    if constexpr (kSym) {
      stage_columns(sm, k0, cols, pos, self, lse, g);
      scale = grad_scale<T>(g, i0, rows, k0, cols), inv_scale = 1.f / scale;
    }
    logits_tile(sm, q, i0, N, !whole, k, k0, M, true, D);
    if constexpr (kSym)
      sym_grad_tile(sm, row, i0 + r, r, h, k0, cols, inv_t, scale);
    else
      grad_tile(sm, row, r, h, k0, cols, inv_t, scale);
    add_products<T, false>(sm, sm.ks, k, k0, M, D, !whole, acc, rows, inv_scale);
  }
  __syncwarp();
  store_rows(acc, out, rows, D, splits == 1 ? inv_t : 1.f);
}

// dq [N, D] = inv_t x the sum of the S partials, in split order
__global__ void __launch_bounds__(256) merge_rows_kernel(const float* __restrict__ part, int64_t N, int64_t D,
                                                         int64_t splits, float inv_t, float* __restrict__ dq) {
  const int64_t n = N * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int64_t s = 0; s < splits; ++s) v += part[s * n + e];
    dq[e] = v * inv_t;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dk_kernel(const T* __restrict__ q, const T* __restrict__ k, const int64_t* __restrict__ pos,
              const int64_t* __restrict__ self, const float* __restrict__ lse, const float* __restrict__ g, int64_t N,
              int64_t M, int64_t D, float inv_t, int64_t panel, bool acc_in_shared, float* __restrict__ dk) {
  SSL_DYN_SHARED(smem);
  const Layout<T> sm = layout<T>(smem, panel, true);
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBK;
  const bool whole = D <= panel;
  if (whole) load_panel(sm, sm.ks, k, k0, M, D, 0);
  const int cols = M - k0 < kBK ? static_cast<int>(M - k0) : kBK;
  const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
  float* acc = acc_in_shared ? sm.acc : dk + k0 * D;  // the block's rows of dk are its own
  zero_rows(acc, cols, D);
  __syncwarp();
  for (int64_t i0 = 0; i0 < N; i0 += kBQ) {
    const int rows = N - i0 < kBQ ? static_cast<int>(N - i0) : kBQ;
    const Row row = load_row(i0 + r, N, pos, self, lse, g);
    const float scale = grad_scale<T>(g, i0, rows), inv_scale = 1.f / scale;
    logits_tile(sm, q, i0, N, true, k, k0, M, !whole, D);
    grad_tile(sm, row, r, h, k0, cols, inv_t, scale);
    add_products<T, true>(sm, sm.qs, q, i0, N, D, !whole, acc, cols, inv_scale);
  }
  __syncwarp();
  store_rows(acc, dk + k0 * D, cols, D, inv_t);
}

// ---- launchers (raw pointers; inputs row-major and contiguous, self may be null)

struct Plan {
  int64_t panel;       // columns of D per panel: >= D (whole tiles) or kDK (streamed)
  bool acc_in_shared;  // the dq / dk accumulator in shared memory (else in the output rows)
  size_t shared;       // dynamic shared memory per block, bytes
};

// The first of: whole tiles (accumulator in shared memory), streamed panels (accumulator in shared
// memory), streamed panels (accumulator in the output rows) that fits min(max_shared, kSharedCap);
// forward needs no accumulator. max_shared: the device's shared memory per block with opt-in; sym:
// the dz kernel.
template <typename T>
inline Plan make_plan(int64_t D, size_t max_shared, bool backward, bool sym = false) {
  const size_t cap = max_shared < kSharedCap ? max_shared : kSharedCap;
  const int64_t whole = D > kDK ? dev::ceil_div(D, kDK) * kDK : kDK;
  const int64_t acc = backward ? D : 0;
  const Plan tries[3] = {{whole, backward, shared_bytes<T>(whole, backward, acc, sym)},
                         {kDK, backward, shared_bytes<T>(kDK, backward, acc, sym)},
                         {kDK, false, shared_bytes<T>(kDK, backward, 0, sym)}};
  for (const Plan& p : tries)
    if (p.shared <= cap) return p;
  return tries[2];  // the smallest (under 48 KiB for every dtype)
}

// Blocks per query tile over the key tiles (grid.y): 1 when the query tiles alone make about two blocks
// per SM (or sm_count <= 0), else enough for that, with at least kMinSplitTiles key tiles per block
inline int64_t split_count(int64_t N, int64_t M, int sm_count) {
  const int64_t rows = dev::ceil_div(N, kBQ), tiles = dev::ceil_div(M, kBK), want = 2 * static_cast<int64_t>(sm_count);
  if (rows >= want) return 1;
  int64_t s = dev::ceil_div(want, rows);
  if (s > tiles / kMinSplitTiles) s = tiles / kMinSplitTiles;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : s;
}

// The workspace (floats) that forward needs: the partials of S > 1 splits, else none
inline int64_t forward_workspace(int64_t N, int64_t M, int sm_count) {
  const int64_t S = split_count(N, M, sm_count);
  return S > 1 ? 3 * S * N : 0;
}

// The workspace (floats) that backward's dq (or backward_sym's dz) needs
inline int64_t backward_workspace(int64_t N, int64_t M, int64_t D, int sm_count) {
  const int64_t S = split_count(N, M, sm_count);
  return S > 1 ? S * N * D : 0;
}

inline dim3 merge_grid(int64_t n) {
  const int64_t blocks = dev::ceil_div(n, 256);
  return dim3(static_cast<unsigned>(blocks < 1024 ? (blocks > 0 ? blocks : 1) : 1024));
}

// loss [N], lse [N] (fp32); sm_count: the device's SMs; workspace: forward_workspace(N, M, sm_count) floats
template <typename T>
void forward(const T* q, const T* k, const int64_t* pos, const int64_t* self, int64_t N, int64_t M, int64_t D,
             float inv_t, float* loss, float* lse, size_t max_shared, int sm_count, float* workspace,
             cudaStream_t stream) {
  if (N == 0) return;
  const Plan p = make_plan<T>(D, max_shared, false);
  const int64_t S = split_count(N, M, sm_count);
  ssl_allow_shared(forward_kernel<T>, p.shared);
  SSL_LAUNCH(dim3(static_cast<unsigned>(dev::ceil_div(N, kBQ)), static_cast<unsigned>(S)), dim3(kThreads), p.shared,
             stream, forward_kernel<T>)(q, k, pos, self, N, M, D, inv_t, p.panel, S, workspace, loss, lse);
  if (S > 1)
    SSL_LAUNCH(merge_grid(N), dim3(256), 0, stream, merge_forward_kernel)(workspace, pos, N, M, S, loss, lse);
}

// dq [N, D] and dk [M, D] (fp32, every element written), each skipped when null; g = dL/dloss [N];
// workspace: backward_workspace(N, M, D, sm_count) floats when dq is wanted
template <typename T>
void backward(const T* q, const T* k, const int64_t* pos, const int64_t* self, const float* lse, const float* g,
              int64_t N, int64_t M, int64_t D, float inv_t, float* dq, float* dk, size_t max_shared, int sm_count,
              float* workspace, cudaStream_t stream) {
  if (D == 0) return;  // nothing to write
  const Plan p = make_plan<T>(D, max_shared, true);
  if (dq != nullptr && N > 0) {
    const int64_t S = split_count(N, M, sm_count);
    ssl_allow_shared(dq_kernel<T, false>, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(dev::ceil_div(N, kBQ)), static_cast<unsigned>(S)), dim3(kThreads),
               p.shared, stream, dq_kernel<T, false>)(q, k, pos, self, lse, g, N, M, D, inv_t, p.panel,
                                                      p.acc_in_shared, S, workspace, dq);
    if (S > 1) SSL_LAUNCH(merge_grid(N * D), dim3(256), 0, stream, merge_rows_kernel)(workspace, N, D, S, inv_t, dq);
  }
  if (dk != nullptr && M > 0) {
    ssl_allow_shared(dk_kernel<T>, p.shared);
    SSL_LAUNCH(dim3(static_cast<unsigned>(dev::ceil_div(M, kBK))), dim3(kThreads), p.shared, stream, dk_kernel<T>)(
        q, k, pos, self, lse, g, N, M, D, inv_t, p.panel, p.acc_in_shared, dk);
  }
}

// dz [N, D] (fp32, every element written) = dq + dk of the loss with keys = queries = z, one kernel;
// lse from forward(z, z, ...), g = dL/dloss [N]; workspace: backward_workspace(N, N, D, sm_count) floats
template <typename T>
void backward_sym(const T* z, const int64_t* pos, const int64_t* self, const float* lse, const float* g, int64_t N,
                  int64_t D, float inv_t, float* dz, size_t max_shared, int sm_count, float* workspace,
                  cudaStream_t stream) {
  if (D == 0 || N == 0) return;  // nothing to write
  const Plan p = make_plan<T>(D, max_shared, true, true);
  const int64_t S = split_count(N, N, sm_count);
  ssl_allow_shared(dq_kernel<T, true>, p.shared);
  SSL_LAUNCH(dim3(static_cast<unsigned>(dev::ceil_div(N, kBQ)), static_cast<unsigned>(S)), dim3(kThreads), p.shared,
             stream, dq_kernel<T, true>)(z, z, pos, self, lse, g, N, N, D, inv_t, p.panel, p.acc_in_shared, S,
                                         workspace, dz);
  if (S > 1) SSL_LAUNCH(merge_grid(N * D), dim3(256), 0, stream, merge_rows_kernel)(workspace, N, D, S, inv_t, dz);
}

}  // namespace contrastive
}  // namespace sslops
