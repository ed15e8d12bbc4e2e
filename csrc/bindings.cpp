// Python bindings of common._C: each entry dispatches on the tensor's device to the
// CPU kernels (always built) or the CUDA kernels (built when nvcc was found).
#include <torch/extension.h>

#include "ops.h"

namespace sslops {
namespace {

bool is_cuda(const at::Tensor& t) {
#ifdef WITH_CUDA
  return t.is_cuda();
#else
  TORCH_CHECK(!t.is_cuda(), "common._C was built without CUDA support");
  return false;
#endif
}

#ifdef WITH_CUDA
#define SSL_DISPATCH(t, name, ...) (is_cuda(t) ? name##_cuda(__VA_ARGS__) : name##_cpu(__VA_ARGS__))
#else
#define SSL_DISPATCH(t, name, ...) (is_cuda(t), name##_cpu(__VA_ARGS__))
#endif

std::vector<at::Tensor> sinkhorn_init(const at::Tensor& s, double eps, const at::Tensor& colmax) {
  return SSL_DISPATCH(s, sinkhorn_init, s, eps, colmax);
}
at::Tensor sinkhorn_step(const at::Tensor& q, const at::Tensor& u) { return SSL_DISPATCH(q, sinkhorn_step, q, u); }
at::Tensor sinkhorn_finish(at::Tensor q, const at::Tensor& u) { return SSL_DISPATCH(q, sinkhorn_finish, q, u); }

std::vector<at::Tensor> contrastive_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                            const c10::optional<at::Tensor>& self, double temperature, int64_t tile_q,
                                            int64_t tile_k) {
  return SSL_DISPATCH(q, contrastive_forward, q, k, pos, self, temperature, tile_q, tile_k);
}
// need_dq comes last in Python (a keyword added after need_dk, tile_q, tile_k)
std::vector<at::Tensor> contrastive_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                             const c10::optional<at::Tensor>& self, double temperature,
                                             const at::Tensor& lse, const at::Tensor& g, bool need_dk,
                                             int64_t tile_q, int64_t tile_k, bool need_dq) {
  return SSL_DISPATCH(q, contrastive_backward, q, k, pos, self, temperature, lse, g, need_dq, need_dk, tile_q, tile_k);
}

// keys is queries (contrastive_loss(z, z, ...))
std::vector<at::Tensor> contrastive_forward_sym(const at::Tensor& z, const at::Tensor& pos,
                                                const c10::optional<at::Tensor>& self, double temperature,
                                                int64_t tile) {
  return SSL_DISPATCH(z, contrastive_forward_sym, z, pos, self, temperature, tile);
}
at::Tensor contrastive_backward_sym(const at::Tensor& z, const at::Tensor& pos, const c10::optional<at::Tensor>& self,
                                    double temperature, const at::Tensor& lse, const at::Tensor& g, int64_t tile) {
  return SSL_DISPATCH(z, contrastive_backward_sym, z, pos, self, temperature, lse, g, tile);
}

// tf32: CUDA only (TF32 tensor cores for the scores, the winner rescored in fp32); the CPU kernels are exact
std::vector<at::Tensor> kmeans_assign(const at::Tensor& x, const at::Tensor& c, bool spherical, int64_t chunk,
                                      bool tf32) {
#ifdef WITH_CUDA
  if (is_cuda(x)) return kmeans_assign_cuda(x, c, spherical, chunk, tf32);
#endif
  (void)tf32;
  return (is_cuda(x), kmeans_assign_cpu(x, c, spherical, chunk));
}
std::vector<at::Tensor> kmeans_update(const at::Tensor& x, const at::Tensor& a, int64_t k) {
  return SSL_DISPATCH(x, kmeans_update, x, a, k);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace sslops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sslops;
  namespace py = pybind11;
  m.doc() = "Compiled kernels of common/ops.py (Sinkhorn, fused contrastive loss, k-means)";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were built");
  m.def("column_max", &column_max_cpu, py::arg("scores"), "CPU only: the max of each column (NaN propagates)");
  m.def("sinkhorn_init", &sinkhorn_init, py::arg("scores"), py::arg("eps"), py::arg("colmax"));
  m.def("sinkhorn_step", &sinkhorn_step, py::arg("q"), py::arg("u"));
  m.def("sinkhorn_finish", &sinkhorn_finish, py::arg("q"), py::arg("u"));
  m.def("contrastive_forward", &contrastive_forward, py::arg("queries"), py::arg("keys"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("temperature"), py::arg("tile_q") = 0, py::arg("tile_k") = 0);
  m.def("contrastive_backward", &contrastive_backward, py::arg("queries"), py::arg("keys"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("temperature"), py::arg("lse"), py::arg("grad_rows"),
        py::arg("need_dk"), py::arg("tile_q") = 0, py::arg("tile_k") = 0, py::arg("need_dq") = true);
  m.def("contrastive_forward_sym", &contrastive_forward_sym, py::arg("z"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("temperature"), py::arg("tile") = 0,
        "keys is queries (CPU: only the tiles on and above the diagonal)");
  m.def("contrastive_backward_sym", &contrastive_backward_sym, py::arg("z"), py::arg("pos_index"),
        py::arg("self_index"), py::arg("temperature"), py::arg("lse"), py::arg("grad_rows"), py::arg("tile") = 0,
        "keys is queries: dz = dq + dk (CUDA: one kernel, fp32)");
  m.def("kmeans_assign", &kmeans_assign, py::arg("x"), py::arg("centroids"), py::arg("spherical"),
        py::arg("chunk") = 0, py::arg("tf32") = false);
  m.def("kmeans_update", &kmeans_update, py::arg("x"), py::arg("assign"), py::arg("k"));
  m.def("cpu_has_bf16_dot", &cpu_has_bf16_dot, "whether this CPU has native bf16 dot products (AVX512_BF16)");
  m.def("kmeans_assign_screened", &kmeans_assign_screened_cpu, py::arg("x"), py::arg("x_bf16"), py::arg("x_norm"),
        py::arg("centroids"), py::arg("spherical"), py::arg("chunk") = 0,
        "CPU only: bf16 GEMM shortlist + exact fp32 rescoring; the same result as kmeans_assign");
}
