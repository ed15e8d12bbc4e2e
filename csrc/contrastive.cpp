// Fused contrastive (InfoNCE / NT-Xent) loss on the CPU.
//
// Forward: for each tile of TQ queries x TK keys, one GEMM (at::mm_out into a reused
// buffer) gives the logits; column self_index is dropped, the positive logit picked,
// and the tile folded into a running max m and sum l per row (online log-sum-exp).
// Only m + log(l) (the per-row log-sum-exp) is kept for backward. Backward recomputes
// each tile, turns it into dL/dlogits = g (softmax - onehot(pos)) in place, and
// accumulates dQ and dK with two more GEMMs. Extra memory: O((N + M) * D + TQ * TK).
//
// Symmetric case (keys is queries, SimCLR on one process): S = Z Z^T / T is symmetric, so
// only the tiles on and above the diagonal are computed. An off-diagonal tile S_IJ serves
// rows I (row-wise log-sum-exp) and, transposed, rows J (column-wise); in backward,
// dL/dS_IJ and dL/dS_JI^T are summed into one tile H and dZ_I += H Z_J / T, dZ_J += H^T Z_I / T.
// That is half the GEMM work of treating keys as a separate matrix (2 N^2 D multiply-adds
// against 4, the naive code's 3), with the same O(N D + tile) memory.
//
// Parallelism is inside each step (the BLAS GEMM and ATen's vectorised, at::parallel_for
// based amax / exp / sum over the tile's rows), not across tiles: a BLAS call inside an
// at::parallel_for region nests OpenMP teams, which measured 10-20x slower on 2 cores.
#include "ops.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sslops {
namespace {

constexpr int64_t kTileQ = 512;
constexpr int64_t kTileK = 4096;
template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

struct Tiles {
  int64_t tq, tk, ntiles, chunks;
};

Tiles make_tiles(int64_t n, int64_t m, int64_t tile_q, int64_t tile_k) {
  Tiles t;
  t.tq = tile_q > 0 ? tile_q : kTileQ;
  t.tk = std::min<int64_t>(tile_k > 0 ? tile_k : kTileK, std::max<int64_t>(m, 1));
  t.ntiles = (n + t.tq - 1) / t.tq;
  t.chunks = 1;
  return t;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                  const c10::optional<at::Tensor>& self) {
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble) && k.scalar_type() == q.scalar_type(),
              "contrastive_loss (CPU kernel): float32 (or float64) queries and keys of one dtype expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && pos.is_contiguous(), "contiguous inputs expected");
  TORCH_CHECK(pos.scalar_type() == at::kLong, "pos_index must be int64");
  if (self.has_value()) TORCH_CHECK(self->scalar_type() == at::kLong && self->is_contiguous());
}

// logits tile S[R, kt] = Qt Kt^T / T with column self_index set to -inf
template <typename scalar_t>
void logits_tile(at::Tensor& s, const at::Tensor& qt, const at::Tensor& kt, double temperature,
                 const int64_t* self, int64_t q0, int64_t k0) {
  at::mm_out(s, qt, kt.t());
  s.div_(temperature);
  if (self != nullptr) {
    const int64_t rows = s.size(0), cols = s.size(1);
    scalar_t* sp = s.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = self[q0 + r] - k0;
      if (j >= 0 && j < cols) sp[r * cols + j] = neg_inf<scalar_t>();
    }
  }
}

}  // namespace

namespace {
template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                  const c10::optional<at::Tensor>& self, double temperature, const Tiles& t,
                  at::Tensor& loss, at::Tensor& lse) {
  using T = scalar_t;
  const int64_t N = q.size(0), M = k.size(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  T* lossp = loss.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  {
    auto buf = at::empty({t.tq * t.tk}, q.options());
    auto shift = at::empty({t.tq, 1}, q.options());
    std::vector<T> m(t.tq), l(t.tq), pl(t.tq);
    {
      for (int64_t tile = 0; tile < t.ntiles; ++tile) {
        const int64_t q0 = tile * t.tq, R = std::min(t.tq, N - q0);
        auto qt = q.narrow(0, q0, R);
        std::fill(m.begin(), m.end(), neg_inf<T>());
        std::fill(l.begin(), l.end(), T(0));
        std::fill(pl.begin(), pl.end(), std::numeric_limits<T>::quiet_NaN());
        for (int64_t k0 = 0; k0 < M; k0 += t.tk) {
          const int64_t kt = std::min(t.tk, M - k0);
          auto s = buf.narrow(0, 0, R * kt).view({R, kt});
          logits_tile<T>(s, qt, k.narrow(0, k0, kt), temperature, sp, q0, k0);
          const T* sd = s.data_ptr<T>();
          for (int64_t r = 0; r < R; ++r) {
            const int64_t j = pp[q0 + r] - k0;
            if (j >= 0 && j < kt) pl[r] = sd[r * kt + j];
          }
          auto tmax = at::amax(s, 1);
          const T* tm = tmax.data_ptr<T>();
          T* sh = shift.data_ptr<T>();
          for (int64_t r = 0; r < R; ++r) {
            const T nm = std::max(m[r], tm[r]);
            sh[r] = nm == neg_inf<T>() ? T(0) : nm;
            l[r] *= std::exp(m[r] - sh[r]);
            m[r] = nm;
          }
          s.sub_(shift.narrow(0, 0, R));
          s.exp_();
          auto tsum = s.sum(1);
          const T* ts = tsum.data_ptr<T>();
          for (int64_t r = 0; r < R; ++r) l[r] += ts[r];
        }
        for (int64_t r = 0; r < R; ++r) {
          const T v = m[r] + std::log(l[r]);
          lsep[q0 + r] = v;
          lossp[q0 + r] = v - pl[r];
        }
      }
    }
  }
}
}  // namespace

std::vector<at::Tensor> contrastive_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                const c10::optional<at::Tensor>& self, double temperature,
                                                int64_t tile_q, int64_t tile_k) {
  check_inputs(q, k, pos, self);
  const int64_t N = q.size(0), M = k.size(0);
  auto loss = at::empty({N}, q.options());
  auto lse = at::empty({N}, q.options());
  if (N == 0) return {loss, lse};
  const Tiles t = make_tiles(N, M, tile_q, tile_k);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "contrastive_forward_cpu",
                             [&] { forward_impl<scalar_t>(q, k, pos, self, temperature, t, loss, lse); });
  return {loss, lse};
}

namespace {
template <typename scalar_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                   const c10::optional<at::Tensor>& self, double temperature, const at::Tensor& lse,
                   const at::Tensor& grad_rows, bool need_dq, bool need_dk, const Tiles& t, at::Tensor& dq,
                   at::Tensor& dk_parts) {
  using T = scalar_t;
  const int64_t N = q.size(0), M = k.size(0);
  const double inv_t = 1.0 / temperature;
  auto lse_c = lse.to(q.scalar_type()).contiguous().unsqueeze(1);
  auto g_c = grad_rows.to(q.scalar_type()).contiguous();
  const T* gp = g_c.data_ptr<T>();
  auto g_col = g_c.unsqueeze(1);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* sp = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  {
    auto buf = at::empty({t.tq * t.tk}, q.options());
    {
      for (int64_t tile = 0; tile < t.ntiles; ++tile) {
        const int64_t q0 = tile * t.tq, R = std::min(t.tq, N - q0);
        auto qt = q.narrow(0, q0, R);
        auto dqt = need_dq ? dq.narrow(0, q0, R) : at::Tensor();
        for (int64_t k0 = 0; k0 < M; k0 += t.tk) {
          const int64_t kt = std::min(t.tk, M - k0);
          auto s = buf.narrow(0, 0, R * kt).view({R, kt});
          auto ktile = k.narrow(0, k0, kt);
          logits_tile<T>(s, qt, ktile, temperature, sp, q0, k0);
          s.sub_(lse_c.narrow(0, q0, R));
          s.exp_();                          // softmax probabilities (self column -> 0)
          s.mul_(g_col.narrow(0, q0, R));    // g_i * p_ij
          T* sd = s.data_ptr<T>();
          for (int64_t r = 0; r < R; ++r) {  // - g_i at the positive
            const int64_t j = pp[q0 + r] - k0;
            if (j >= 0 && j < kt) sd[r * kt + j] -= gp[q0 + r];
          }
          if (need_dq) dqt.addmm_(s, ktile, 1.0, inv_t);
          if (need_dk) dk_parts[0].narrow(0, k0, kt).addmm_(s.t(), qt, 1.0, inv_t);
        }
      }
    }
  }
}
}  // namespace

std::vector<at::Tensor> contrastive_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq,
                                                 bool need_dk, int64_t tile_q, int64_t tile_k) {
  check_inputs(q, k, pos, self);
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  auto dq = need_dq ? at::zeros({N, D}, q.options()) : at::Tensor();
  if (N == 0) return {dq, need_dk ? at::zeros({M, D}, q.options()) : at::Tensor()};
  const Tiles t = make_tiles(N, M, tile_q, tile_k);
  auto dk_parts = need_dk ? at::zeros({t.chunks, M, D}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "contrastive_backward_cpu", [&] {
    backward_impl<scalar_t>(q, k, pos, self, temperature, lse, grad_rows, need_dq, need_dk, t, dq, dk_parts);
  });
  at::Tensor dk;
  if (need_dk) dk = t.chunks == 1 ? dk_parts[0] : dk_parts.sum(0);
  return {dq, dk};
}

// ----------------------------------------------------------------------------- symmetric (keys is queries)
namespace {

constexpr int64_t kTileSym = 512;

// Index helpers: for query i, the key column excluded (self) and the positive, or -1.
struct Rows {
  const int64_t* pos;
  const int64_t* self;
  int64_t self_of(int64_t i) const { return self ? self[i] : -1; }
};

// Row-wise online log-sum-exp of the tile S[R, C] for queries i0.., keys j0..
template <typename T>
void rows_update(T* S, int64_t R, int64_t C, int64_t i0, int64_t j0, const Rows& idx, double* m, double* l,
                 double* pl) {
  at::parallel_for(0, R, 8, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      T* row = S + a * C;
      const int64_t i = i0 + a, js = idx.self_of(i) - j0, jp = idx.pos[i] - j0;
      if (jp >= 0 && jp < C) pl[i] = row[jp];
      T saved = 0;
      const bool masked = js >= 0 && js < C;
      if (masked) saved = row[js], row[js] = -std::numeric_limits<T>::infinity();
      const double tile_max = simd::max_of<T>(row, C, -std::numeric_limits<T>::infinity());
      const double nm = std::max(m[i], tile_max), shift = nm == -std::numeric_limits<double>::infinity() ? 0 : nm;
      l[i] = l[i] * std::exp(m[i] - shift) + simd::sum_exp<T>(row, static_cast<T>(shift), C);
      m[i] = nm;
      if (masked) row[js] = saved;
    }
  });
}

// Column-wise online log-sum-exp of S[R, C] for queries j0 + b (their keys are i0 + a)
template <typename T>
void cols_update(T* S, int64_t R, int64_t C, int64_t i0, int64_t j0, const Rows& idx, double* m, double* l,
                 double* pl) {
  std::vector<std::pair<int64_t, T>> saved;  // (flat index, value) of the masked entries
  for (int64_t b = 0; b < C; ++b) {
    const int64_t j = j0 + b, as = idx.self_of(j) - i0, ap = idx.pos[j] - i0;
    if (ap >= 0 && ap < R) pl[j] = S[ap * C + b];
    if (as >= 0 && as < R) saved.emplace_back(as * C + b, S[as * C + b]), S[as * C + b] = -std::numeric_limits<T>::infinity();
  }
  at::parallel_for(0, C, 64, [&](int64_t b0, int64_t b1) {
    const int64_t w = b1 - b0;
    std::vector<T> col_max(w, -std::numeric_limits<T>::infinity()), shift(w);
    std::vector<double> sum(w, 0.0);
    for (int64_t a = 0; a < R; ++a) {
      const T* row = S + a * C + b0;
      for (int64_t b = 0; b < w; ++b) col_max[b] = row[b] > col_max[b] ? row[b] : col_max[b];
    }
    for (int64_t b = 0; b < w; ++b) {
      const int64_t j = j0 + b0 + b;
      const double nm = std::max<double>(m[j], col_max[b]);
      shift[b] = static_cast<T>(nm == -std::numeric_limits<double>::infinity() ? 0 : nm);
      l[j] *= std::exp(m[j] - static_cast<double>(shift[b]));
      m[j] = nm;
    }
    std::vector<T> e(w);
    for (int64_t a = 0; a < R; ++a) {
      const T* row = S + a * C + b0;
      for (int64_t b = 0; b < w; ++b) e[b] = row[b] - shift[b];
      simd::exp_inplace<T>(e.data(), w);
      for (int64_t b = 0; b < w; ++b) sum[b] += e[b];
    }
    for (int64_t b = 0; b < w; ++b) l[j0 + b0 + b] += sum[b];
  });
  for (auto& entry : saved) S[entry.first] = entry.second;
}

// H[a, b] = dL/dS_ab (query i0+a, key j0+b) + dL/dS_ba (query j0+b, key i0+a), both from the saved lse
template <typename T>
void symmetric_grad_tile(const T* S, T* H, int64_t R, int64_t C, int64_t i0, int64_t j0, const Rows& idx,
                         const T* lse, const T* g) {
  at::parallel_for(0, R, 8, [&](int64_t a0, int64_t a1) {
    std::vector<T> e(C);
    for (int64_t a = a0; a < a1; ++a) {
      const T* row = S + a * C;
      T* h = H + a * C;
      const T gi = g[i0 + a], li = lse[i0 + a];
      for (int64_t b = 0; b < C; ++b) e[b] = row[b] - li;
      simd::exp_inplace<T>(e.data(), C);
      for (int64_t b = 0; b < C; ++b) h[b] = gi * e[b];
      for (int64_t b = 0; b < C; ++b) e[b] = row[b] - lse[j0 + b];
      simd::exp_inplace<T>(e.data(), C);
      for (int64_t b = 0; b < C; ++b) h[b] += g[j0 + b] * e[b];
    }
  });
  // entries touched by a mask or a positive: recomputed from the definition
  auto exact = [&](int64_t a, int64_t b) {
    const int64_t i = i0 + a, j = j0 + b;
    const T s = S[a * C + b];
    T v = 0;
    if (idx.self_of(i) != j) v += g[i] * std::exp(s - lse[i]);
    if (idx.pos[i] == j) v -= g[i];
    if (idx.self_of(j) != i) v += g[j] * std::exp(s - lse[j]);
    if (idx.pos[j] == i) v -= g[j];
    H[a * C + b] = v;
  };
  for (int64_t a = 0; a < R; ++a) {
    const int64_t i = i0 + a;
    for (int64_t j : {idx.self_of(i), idx.pos[i]})
      if (j - j0 >= 0 && j - j0 < C) exact(a, j - j0);
  }
  for (int64_t b = 0; b < C; ++b) {
    const int64_t j = j0 + b;
    for (int64_t i : {idx.self_of(j), idx.pos[j]})
      if (i - i0 >= 0 && i - i0 < R) exact(i - i0, b);
  }
}

}  // namespace

std::vector<at::Tensor> contrastive_forward_sym_cpu(const at::Tensor& z, const at::Tensor& pos,
                                                    const c10::optional<at::Tensor>& self, double temperature,
                                                    int64_t tile) {
  check_inputs(z, z, pos, self);
  const int64_t N = z.size(0), tb = tile > 0 ? tile : kTileSym;
  auto loss = at::empty({N}, z.options());
  auto lse = at::empty({N}, z.options());
  if (N == 0) return {loss, lse};
  std::vector<double> m(N, -std::numeric_limits<double>::infinity()), l(N, 0.0),
      pl(N, std::numeric_limits<double>::quiet_NaN());
  const Rows idx{pos.data_ptr<int64_t>(), self.has_value() ? self->data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "contrastive_forward_sym_cpu", [&] {
    auto buf = at::empty({std::min(tb, N) * std::min(tb, N)}, z.options());
    for (int64_t i0 = 0; i0 < N; i0 += tb) {
      const int64_t R = std::min(tb, N - i0);
      for (int64_t j0 = i0; j0 < N; j0 += tb) {
        const int64_t C = std::min(tb, N - j0);
        auto s = buf.narrow(0, 0, R * C).view({R, C});
        at::addmm_out(s, s, z.narrow(0, i0, R), z.narrow(0, j0, C).t(), 0.0, 1.0 / temperature);  // beta 0: s unread
        scalar_t* sp = s.data_ptr<scalar_t>();
        rows_update<scalar_t>(sp, R, C, i0, j0, idx, m.data(), l.data(), pl.data());
        if (j0 != i0) cols_update<scalar_t>(sp, R, C, i0, j0, idx, m.data(), l.data(), pl.data());
      }
    }
    scalar_t* lossp = loss.data_ptr<scalar_t>();
    scalar_t* lsep = lse.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      const double v = m[i] + std::log(l[i]);
      lsep[i] = static_cast<scalar_t>(v);
      lossp[i] = static_cast<scalar_t>(v - pl[i]);
    }
  });
  return {loss, lse};
}

at::Tensor contrastive_backward_sym_cpu(const at::Tensor& z, const at::Tensor& pos,
                                        const c10::optional<at::Tensor>& self, double temperature,
                                        const at::Tensor& lse, const at::Tensor& grad_rows, int64_t tile) {
  check_inputs(z, z, pos, self);
  const int64_t N = z.size(0), D = z.size(1), tb = tile > 0 ? tile : kTileSym;
  auto dz = at::zeros({N, D}, z.options());
  if (N == 0) return dz;
  const Rows idx{pos.data_ptr<int64_t>(), self.has_value() ? self->data_ptr<int64_t>() : nullptr};
  auto lse_c = lse.to(z.scalar_type()).contiguous();
  auto g_c = grad_rows.to(z.scalar_type()).contiguous();
  const double inv_t = 1.0 / temperature;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "contrastive_backward_sym_cpu", [&] {
    const int64_t t0 = std::min(tb, N);
    auto sbuf = at::empty({t0 * t0}, z.options());
    auto hbuf = at::empty({t0 * t0}, z.options());
    for (int64_t i0 = 0; i0 < N; i0 += tb) {
      const int64_t R = std::min(tb, N - i0);
      auto zi = z.narrow(0, i0, R);
      for (int64_t j0 = i0; j0 < N; j0 += tb) {
        const int64_t C = std::min(tb, N - j0);
        auto zj = z.narrow(0, j0, C);
        auto s = sbuf.narrow(0, 0, R * C).view({R, C});
        auto h = hbuf.narrow(0, 0, R * C).view({R, C});
        at::addmm_out(s, s, zi, zj.t(), 0.0, inv_t);
        symmetric_grad_tile<scalar_t>(s.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), R, C, i0, j0, idx,
                                      lse_c.data_ptr<scalar_t>(), g_c.data_ptr<scalar_t>());
        dz.narrow(0, i0, R).addmm_(h, zj, 1.0, inv_t);
        if (j0 != i0) dz.narrow(0, j0, C).addmm_(h.t(), zi, 1.0, inv_t);
      }
    }
  });
  return dz;
}

}  // namespace sslops
