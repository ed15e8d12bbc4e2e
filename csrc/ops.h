// Declarations shared by the CPU (.cpp) and CUDA (.cu) kernels of common._C.
// Python (common/ops.py) validates inputs, drives the iterations and does the
// torch.distributed collectives; these functions are the per-rank hot loops.
#pragma once
#include <ATen/ATen.h>
#include <tuple>
#include <vector>

namespace sslops {

// ---- sinkhorn: Q = exp(scores/eps - colmax[k] - rowshift[b]) kept once (fp32), then
// scaling vectors u (prototypes) and v (samples) instead of rewriting Q each pass.
// column_max (CPU only; CUDA uses torch.amax): max over rows, a NaN propagates.
at::Tensor column_max_cpu(const at::Tensor& scores);
// init: returns (Q, colsum of Q) ; colmax is the (global) column max of scores/eps.
std::vector<at::Tensor> sinkhorn_init_cpu(const at::Tensor& scores, double eps, const at::Tensor& colmax);
// step: v_b = 1/sum_k Q[b,k] u_k ; returns colsum_k = sum_b Q[b,k] v_b (float64)
at::Tensor sinkhorn_step_cpu(const at::Tensor& q, const at::Tensor& u);
// finish: in place Q[b,k] <- Q[b,k] u_k / sum_k' Q[b,k'] u_k'  (rows sum to 1)
at::Tensor sinkhorn_finish_cpu(at::Tensor q, const at::Tensor& u);

// ---- contrastive loss: tiled online log-sum-exp, never N x M.
// forward: returns (per-row loss fp32 [N], per-row logsumexp fp32 [N])
std::vector<at::Tensor> contrastive_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                const c10::optional<at::Tensor>& self, double temperature,
                                                int64_t tile_q, int64_t tile_k);
// backward: grad_rows [N] (dL/dloss_i); returns (dq fp32 [N,D], dk fp32 [M,D]), each undefined when not needed
std::vector<at::Tensor> contrastive_backward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq,
                                                 bool need_dk, int64_t tile_q, int64_t tile_k);

// symmetric case (keys is queries): returns (loss, lse) / dz. CPU: only the tiles on and above the diagonal;
// CUDA: the general forward, and one dz kernel in place of dq + dk (fp32 dz)
std::vector<at::Tensor> contrastive_forward_sym_cpu(const at::Tensor& z, const at::Tensor& pos,
                                                    const c10::optional<at::Tensor>& self, double temperature,
                                                    int64_t tile);
at::Tensor contrastive_backward_sym_cpu(const at::Tensor& z, const at::Tensor& pos,
                                        const c10::optional<at::Tensor>& self, double temperature,
                                        const at::Tensor& lse, const at::Tensor& grad_rows, int64_t tile);

// ---- k-means
// assign: (best score fp32 [N], best centroid int64 [N]); score = x.c (spherical) or x.c - |c|^2/2
std::vector<at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t chunk);
// update: (sums fp32 [K, D], counts fp32 [K]) of the rows assigned to each centroid
std::vector<at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& assign, int64_t k);
// screened assign (CPU with native bf16 dot products): bf16 GEMM shortlist, exact fp32 rescoring;
// x_bf16 = x in bfloat16, x_norm = |x| per row (float32); same result as kmeans_assign_cpu
bool cpu_has_bf16_dot();
std::vector<at::Tensor> kmeans_assign_screened_cpu(const at::Tensor& x, const at::Tensor& x_bf16,
                                                   const at::Tensor& x_norm, const at::Tensor& c, bool spherical,
                                                   int64_t chunk);

#ifdef WITH_CUDA
std::vector<at::Tensor> sinkhorn_init_cuda(const at::Tensor& scores, double eps, const at::Tensor& colmax);
at::Tensor sinkhorn_step_cuda(const at::Tensor& q, const at::Tensor& u);
at::Tensor sinkhorn_finish_cuda(at::Tensor q, const at::Tensor& u);
std::vector<at::Tensor> contrastive_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 int64_t tile_q, int64_t tile_k);
std::vector<at::Tensor> contrastive_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                  const c10::optional<at::Tensor>& self, double temperature,
                                                  const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq,
                                                  bool need_dk, int64_t tile_q, int64_t tile_k);
std::vector<at::Tensor> contrastive_forward_sym_cuda(const at::Tensor& z, const at::Tensor& pos,
                                                     const c10::optional<at::Tensor>& self, double temperature,
                                                     int64_t tile);
at::Tensor contrastive_backward_sym_cuda(const at::Tensor& z, const at::Tensor& pos,
                                         const c10::optional<at::Tensor>& self, double temperature,
                                         const at::Tensor& lse, const at::Tensor& grad_rows, int64_t tile);
std::vector<at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t chunk,
                                           bool tf32);
std::vector<at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& assign, int64_t k);
#endif

}  // namespace sslops
