// The contrastive loss kernels (csrc/kernels/contrastive.cuh) on the emulator, behind a C
// interface for tests/test_cuda_emulated_contrastive.py.
#include "harness.h"
#include "../kernels/contrastive.cuh"

namespace {

// fn(T()) for dtype code 0 float32, 1 float16 (raw bits), 2 bfloat16 (raw bits)
template <typename Fn>
void by_dtype(int dtype, Fn fn) {
  switch (dtype) {
    case 0: fn(float()); break;
    case 1: fn(__half()); break;
    case 2: fn(__nv_bfloat16()); break;
    default: throw emu::Error("unknown dtype code");
  }
}

}  // namespace

extern "C" {

// loss [N], lse [N]; self may be null; max_shared: shared memory per block with opt-in; sm_count: the SMs
// of the device emulated; workspace: emu_contrastive_workspace(0, ...) floats
int emu_contrastive_forward(int dtype, const void* q, const void* k, const int64_t* pos, const int64_t* self,
                            int64_t N, int64_t M, int64_t D, float inv_t, float* loss, float* lse, int64_t max_shared,
                            int sm_count, float* workspace, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      sslops::contrastive::forward(static_cast<const T*>(q), static_cast<const T*>(k), pos, self, N, M, D, inv_t,
                                   loss, lse, static_cast<size_t>(max_shared), sm_count, workspace, nullptr);
    });
  });
}

// dq [N, D] (when need_dq) and dk [M, D] (when need_dk); max_shared: shared memory per block with opt-in;
// workspace: emu_contrastive_workspace(1, ...) floats
int emu_contrastive_backward(int dtype, const void* q, const void* k, const int64_t* pos, const int64_t* self,
                             const float* lse, const float* g, int64_t N, int64_t M, int64_t D, float inv_t,
                             int need_dq, int need_dk, float* dq, float* dk, int64_t max_shared, int sm_count,
                             float* workspace, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      sslops::contrastive::backward(static_cast<const T*>(q), static_cast<const T*>(k), pos, self, lse, g, N, M, D,
                                    inv_t, need_dq ? dq : nullptr, need_dk ? dk : nullptr,
                                    static_cast<size_t>(max_shared), sm_count, workspace, nullptr);
    });
  });
}

// dz [N, D] of the loss with keys = queries = z (the dz kernel); lse from emu_contrastive_forward(z, z, ...)
int emu_contrastive_backward_sym(int dtype, const void* z, const int64_t* pos, const int64_t* self, const float* lse,
                                 const float* g, int64_t N, int64_t D, float inv_t, float* dz, int64_t max_shared,
                                 int sm_count, float* workspace, char* err, int err_len) {
  return guarded(err, err_len, [&] {
    by_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      sslops::contrastive::backward_sym(static_cast<const T*>(z), pos, self, lse, g, N, D, inv_t, dz,
                                        static_cast<size_t>(max_shared), sm_count, workspace, nullptr);
    });
  });
}

// The workspace (floats) of the forward (which 0) or of dq / dz (which 1), and the number of splits (which 2)
int64_t emu_contrastive_workspace(int which, int64_t N, int64_t M, int64_t D, int sm_count) {
  namespace c = sslops::contrastive;
  return which == 0 ? c::forward_workspace(N, M, sm_count)
                    : which == 1 ? c::backward_workspace(N, M, D, sm_count) : c::split_count(N, M, sm_count);
}

// The kernels' plan at this D (backward: the dq / dk kernels, sym: the dz kernel): its panel width
// (>= D: whole tiles) times 2, plus 1 when the accumulators are in shared memory
int64_t emu_contrastive_plan(int dtype, int64_t D, int64_t max_shared, int backward, int sym) {
  int64_t out = 0;
  by_dtype(dtype, [&](auto zero) {
    const auto p = sslops::contrastive::make_plan<decltype(zero)>(D, static_cast<size_t>(max_shared), backward != 0,
                                                                  sym != 0);
    out = 2 * p.panel + (p.acc_in_shared ? 1 : 0);
  });
  return out;
}

}  // extern "C"
