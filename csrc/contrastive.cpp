// Fused contrastive (InfoNCE / NT-Xent) loss on the CPU.
//
// Forward: for each tile of TQ queries x TK keys, one GEMM (at::mm_out into a reused
// buffer) gives the logits; column self_index is dropped, the positive logit picked,
// and the tile folded into a running max m and sum l per row (online log-sum-exp).
// Only m + log(l) (the per-row log-sum-exp) is kept for backward. Backward recomputes
// each tile, turns it into dL/dlogits = g (softmax - onehot(pos)) in place, and
// accumulates dQ and dK with two more GEMMs. Extra memory: O((N + M) * D + TQ * TK).
//
// Parallelism is inside each step (the BLAS GEMM and ATen's vectorised, at::parallel_for
// based amax / exp / sum over the tile's rows), not across tiles: a BLAS call inside an
// at::parallel_for region nests OpenMP teams, which measured 10-20x slower on 2 cores.
#include "ops.h"

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
                   const at::Tensor& grad_rows, bool need_dk, const Tiles& t, at::Tensor& dq, at::Tensor& dk_parts) {
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
        auto dqt = dq.narrow(0, q0, R);
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
          dqt.addmm_(s, ktile, 1.0, inv_t);
          if (need_dk) dk_parts[0].narrow(0, k0, kt).addmm_(s.t(), qt, 1.0, inv_t);
        }
      }
    }
  }
}
}  // namespace

std::vector<at::Tensor> contrastive_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dk,
                                                 int64_t tile_q, int64_t tile_k) {
  check_inputs(q, k, pos, self);
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  auto dq = at::zeros({N, D}, q.options());
  if (N == 0) return {dq, need_dk ? at::zeros({M, D}, q.options()) : at::Tensor()};
  const Tiles t = make_tiles(N, M, tile_q, tile_k);
  auto dk_parts = need_dk ? at::zeros({t.chunks, M, D}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "contrastive_backward_cpu", [&] {
    backward_impl<scalar_t>(q, k, pos, self, temperature, lse, grad_rows, need_dk, t, dq, dk_parts);
  });
  at::Tensor dk;
  if (need_dk) dk = t.chunks == 1 ? dk_parts[0] : dk_parts.sum(0);
  return {dq, dk};
}

}  // namespace sslops
