// Fused contrastive loss on CUDA: the ATen side of csrc/kernels/contrastive.cuh (the kernels and
// their launch plan, also built against the CPU emulator by the tests). One flash-attention-style
// kernel per pass: the logits tiles never leave the chip, no cuBLAS, no workspace; backward is a
// dq kernel and a dk kernel (each launched only when its gradient is needed), or one dz kernel when
// the keys are the queries, deterministic.
//
// tile_q / tile_k size the CPU kernel's GEMM tiles; the CUDA tiles are fixed (64 x 64, see the
// header) and these arguments are ignored here.
#include "cuda_utils.cuh"
#include "kernels/contrastive.cuh"
#include "ops.h"

namespace sslops {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                  const c10::optional<at::Tensor>& self) {
  const auto t = q.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && k.scalar_type() == t,
              "contrastive_loss (CUDA kernel): float32, float16 or bfloat16 queries and keys of one dtype expected");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), "contrastive_loss: [N, D] and [M, D] expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && pos.is_contiguous(), "contiguous inputs expected");
  TORCH_CHECK(pos.scalar_type() == at::kLong, "pos_index must be int64");
  if (self.has_value()) TORCH_CHECK(self->scalar_type() == at::kLong && self->is_contiguous());
}

// fn(T*) with the input pointers as the kernels' element type
template <typename Fn>
void by_dtype(const at::Tensor& q, const at::Tensor& k, Fn fn) {
  switch (q.scalar_type()) {
    case at::kFloat: fn(q.data_ptr<float>(), k.data_ptr<float>()); break;
    case at::kHalf:
      fn(reinterpret_cast<const __half*>(q.data_ptr<at::Half>()), reinterpret_cast<const __half*>(k.data_ptr<at::Half>()));
      break;
    default:
      fn(reinterpret_cast<const __nv_bfloat16*>(q.data_ptr<at::BFloat16>()),
         reinterpret_cast<const __nv_bfloat16*>(k.data_ptr<at::BFloat16>()));
  }
}

// What the backward entries hand their kernels besides the inputs
struct BackwardArgs {
  at::Tensor lse, g;     // fp32, contiguous
  const int64_t* self;  // or null
  float inv_t;
  size_t max_shared;  // per block, with opt-in
  int sms;
  cudaStream_t stream;
};

BackwardArgs backward_args(const at::Tensor& lse, const at::Tensor& grad_rows, const c10::optional<at::Tensor>& self,
                           double temperature) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  return {lse.to(at::kFloat).contiguous(),
          grad_rows.to(at::kFloat).contiguous(),
          self.has_value() ? self->data_ptr<int64_t>() : nullptr,
          static_cast<float>(1.0 / temperature),
          props->sharedMemPerBlockOptin,
          props->multiProcessorCount,
          at::cuda::getCurrentCUDAStream()};
}

}  // namespace

std::vector<at::Tensor> contrastive_forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                 const c10::optional<at::Tensor>& self, double temperature,
                                                 int64_t /*tile_q*/, int64_t /*tile_k*/) {
  check_inputs(q, k, pos, self);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  auto fopt = q.options().dtype(at::kFloat);
  auto loss = at::empty({N}, fopt), lse = at::empty({N}, fopt);
  const int64_t* sp = self.has_value() ? self->data_ptr<int64_t>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int sms = props->multiProcessorCount;
  auto workspace = at::empty({contrastive::forward_workspace(N, M, sms)}, fopt);  // split partials, often none
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  by_dtype(q, k, [&](auto qp, auto kp) {
    contrastive::forward(qp, kp, pos.data_ptr<int64_t>(), sp, N, M, D, inv_t, loss.data_ptr<float>(),
                         lse.data_ptr<float>(), props->sharedMemPerBlockOptin, sms, workspace.data_ptr<float>(),
                         stream);
  });
  cuda::check_launch();
  return {loss, lse};
}

std::vector<at::Tensor> contrastive_backward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                                  const c10::optional<at::Tensor>& self, double temperature,
                                                  const at::Tensor& lse, const at::Tensor& grad_rows, bool need_dq,
                                                  bool need_dk, int64_t /*tile_q*/, int64_t /*tile_k*/) {
  check_inputs(q, k, pos, self);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t N = q.size(0), M = k.size(0), D = q.size(1);
  auto fopt = q.options().dtype(at::kFloat);
  // the kernels write every element (zeros where no query or key contributes)
  auto dq = need_dq ? at::empty({N, D}, fopt) : at::Tensor();
  auto dk = need_dk ? at::empty({M, D}, fopt) : at::Tensor();
  const BackwardArgs a = backward_args(lse, grad_rows, self, temperature);
  auto workspace = at::empty({need_dq ? contrastive::backward_workspace(N, M, D, a.sms) : 0}, fopt);
  by_dtype(q, k, [&](auto qp, auto kp) {
    contrastive::backward(qp, kp, pos.data_ptr<int64_t>(), a.self, a.lse.data_ptr<float>(), a.g.data_ptr<float>(), N,
                          M, D, a.inv_t, need_dq ? dq.data_ptr<float>() : nullptr,
                          need_dk ? dk.data_ptr<float>() : nullptr, a.max_shared, a.sms, workspace.data_ptr<float>(),
                          a.stream);
  });
  cuda::check_launch();
  return {dq, dk};
}

// keys is queries: the forward is the general one on (z, z); the backward is the dz kernel (dq + dk in one pass,
// half the work of the dq and dk kernels). tile is the CPU kernel's and is ignored here.
std::vector<at::Tensor> contrastive_forward_sym_cuda(const at::Tensor& z, const at::Tensor& pos,
                                                     const c10::optional<at::Tensor>& self, double temperature,
                                                     int64_t /*tile*/) {
  return contrastive_forward_cuda(z, z, pos, self, temperature, 0, 0);
}

at::Tensor contrastive_backward_sym_cuda(const at::Tensor& z, const at::Tensor& pos,
                                         const c10::optional<at::Tensor>& self, double temperature,
                                         const at::Tensor& lse, const at::Tensor& grad_rows, int64_t /*tile*/) {
  check_inputs(z, z, pos, self);
  c10::cuda::CUDAGuard guard(z.device());
  const int64_t N = z.size(0), D = z.size(1);
  auto fopt = z.options().dtype(at::kFloat);
  auto dz = at::empty({N, D}, fopt);  // the kernel writes every element
  const BackwardArgs a = backward_args(lse, grad_rows, self, temperature);
  auto workspace = at::empty({contrastive::backward_workspace(N, N, D, a.sms)}, fopt);
  by_dtype(z, z, [&](auto zp, auto) {
    contrastive::backward_sym(zp, pos.data_ptr<int64_t>(), a.self, a.lse.data_ptr<float>(), a.g.data_ptr<float>(), N,
                              D, a.inv_t, dz.data_ptr<float>(), a.max_shared, a.sms, workspace.data_ptr<float>(),
                              a.stream);
  });
  cuda::check_launch();
  return dz;
}

}  // namespace sslops
