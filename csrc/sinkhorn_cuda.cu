// Sinkhorn-Knopp (SwAV) on CUDA: the ATen side of csrc/kernels/sinkhorn.cuh (the kernels and
// their launch plan, also built against the CPU emulator by the tests). One pass over Q per
// call; column sums added up in a fixed order (deterministic).
#include "cuda_utils.cuh"
#include "kernels/sinkhorn.cuh"
#include "ops.h"

namespace sslops {
namespace {

struct Limits {
  int64_t max_blocks;
  size_t max_shared;
};

Limits limits(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  // two row blocks per SM: enough loads in flight for a bandwidth-bound pass, few partials to add up
  return {2 * static_cast<int64_t>(prop->multiProcessorCount), static_cast<size_t>(prop->sharedMemPerBlockOptin)};
}

at::Tensor workspace(const at::Tensor& like, int64_t B, int64_t K, const Limits& lim) {
  const int64_t n = sinkhorn::workspace_doubles(B, K, lim.max_blocks, lim.max_shared);
  return at::empty({n > 0 ? n : 1}, like.options().dtype(at::kDouble));
}

}  // namespace

std::vector<at::Tensor> sinkhorn_init_cuda(const at::Tensor& scores, double eps, const at::Tensor& colmax) {
  TORCH_CHECK(scores.is_contiguous() && scores.dim() == 2, "sinkhorn_init: contiguous scores expected");
  c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = scores.size(0), K = scores.size(1);
  const Limits lim = limits(scores);
  auto q = at::empty({B, K}, scores.options().dtype(at::kFloat));
  auto colsum = at::empty({K}, scores.options().dtype(at::kDouble));
  auto ws = workspace(scores, B, K, lim);
  auto cm = colmax.to(at::kFloat).contiguous();
  const float inv_eps = static_cast<float>(1.0 / eps);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (scores.scalar_type() == at::kFloat) {
    sinkhorn::init(scores.data_ptr<float>(), cm.data_ptr<float>(), inv_eps, B, K, q.data_ptr<float>(),
                   colsum.data_ptr<double>(), ws.data_ptr<double>(), lim.max_blocks, lim.max_shared, stream);
  } else if (scores.scalar_type() == at::kDouble) {
    sinkhorn::init(scores.data_ptr<double>(), cm.data_ptr<float>(), inv_eps, B, K, q.data_ptr<float>(),
                   colsum.data_ptr<double>(), ws.data_ptr<double>(), lim.max_blocks, lim.max_shared, stream);
  } else if (scores.scalar_type() == at::kHalf) {
    sinkhorn::init(reinterpret_cast<const __half*>(scores.data_ptr<at::Half>()), cm.data_ptr<float>(), inv_eps, B, K,
                   q.data_ptr<float>(), colsum.data_ptr<double>(), ws.data_ptr<double>(), lim.max_blocks,
                   lim.max_shared, stream);
  } else if (scores.scalar_type() == at::kBFloat16) {
    sinkhorn::init(reinterpret_cast<const __nv_bfloat16*>(scores.data_ptr<at::BFloat16>()), cm.data_ptr<float>(),
                   inv_eps, B, K, q.data_ptr<float>(), colsum.data_ptr<double>(), ws.data_ptr<double>(),
                   lim.max_blocks, lim.max_shared, stream);
  } else {
    TORCH_CHECK(false, "sinkhorn_init (CUDA): float64, float32, float16 or bfloat16 scores expected, got ", scores.scalar_type());
  }
  cuda::check_launch();
  return {q, colsum};
}

at::Tensor sinkhorn_step_cuda(const at::Tensor& q, const at::Tensor& u) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), K = q.size(1);
  const Limits lim = limits(q);
  auto ud = u.to(at::kDouble).contiguous();
  auto colsum = at::empty({K}, q.options().dtype(at::kDouble));
  auto ws = workspace(q, B, K, lim);
  sinkhorn::step(q.data_ptr<float>(), ud.data_ptr<double>(), B, K, colsum.data_ptr<double>(), ws.data_ptr<double>(),
                 lim.max_blocks, lim.max_shared, at::cuda::getCurrentCUDAStream());
  cuda::check_launch();
  return colsum;
}

at::Tensor sinkhorn_finish_cuda(at::Tensor q, const at::Tensor& u) {
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), K = q.size(1);
  const Limits lim = limits(q);
  auto ud = u.to(at::kDouble).contiguous();
  sinkhorn::finish(q.data_ptr<float>(), ud.data_ptr<double>(), B, K, lim.max_blocks, lim.max_shared,
                   at::cuda::getCurrentCUDAStream());
  cuda::check_launch();
  return q;
}

}  // namespace sslops
