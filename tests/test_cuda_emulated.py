"""The CUDA kernels, run on the CPU: csrc/kernels/*.cuh built against the emulator csrc/emu/cuda_emu.h.

The same kernel source that nvcc compiles into common._C is compiled here by the host C++
compiler, each GPU thread a fiber with real barriers, warp shuffles and poisoned shared memory
(see the emulator's header). Every kernel runs under two scheduling orders (the lowest-numbered
runnable thread and block first, or the highest) and is checked against the float64 reference
at odd sizes; its buffers sit between NaN guard bands that must come back untouched. The last
tests plant the faults this is meant to catch (a missing __syncthreads, a warp dropped from a
reduction, an off-by-one loop bound) into a copy of the source and show that each one fails.

Needs a C++17 compiler (`c++`, or $CXX); no GPU, no CUDA toolkit.
"""
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import ops

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
ORDERS = {"low-first": 0, "high-first": 1}
H100_SHARED = 227 * 1024  # dynamic shared memory per block with opt-in (sharedMemPerBlockOptin)
F32_TOL = 2e-5  # as tests/test_ops.py: slack on top of the naive float32 formula's error

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (set CXX) to build the emulated kernels")


class EmulatorFault(Exception):
    """A kernel fault the emulator reported (divergence, bad launch, ...)."""


class Emulated:
    """The harness library (csrc/emu/harness*.cpp) built from the kernels under `root`."""

    def __init__(self, root, out_dir):
        so = Path(out_dir) / "emu_harness.so"
        sources = sorted(str(p) for p in (Path(root) / "emu").glob("harness*.cpp"))
        cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-I", str(root), *sources, "-o", str(so)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"building the emulated kernels failed:\n{proc.stderr[-4000:]}"
        self.lib = ctypes.CDLL(str(so))
        i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
        err = [ctypes.c_char_p, i32]
        self.lib.emu_sinkhorn_init.argtypes = [i32, ptr, ptr, f32, i64, i64, ptr, ptr, ptr, i64, i64, *err]
        self.lib.emu_sinkhorn_step.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, i64, *err]
        self.lib.emu_sinkhorn_finish.argtypes = [ptr, ptr, i64, i64, i64, i64, *err]
        self.lib.emu_sinkhorn_workspace.argtypes = [i64, i64, i64, i64]
        self.lib.emu_sinkhorn_workspace.restype = i64
        self.lib.emu_selftest.argtypes = [i32, ptr, ptr, ptr, *err]
        self.lib.emu_kmeans_assign.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, ptr, ptr, i64, *err]
        self.lib.emu_kmeans_update.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, *err]
        self.lib.emu_kmeans_max_pieces.argtypes = [i64, i64]
        self.lib.emu_kmeans_max_pieces.restype = i64
        self.lib.emu_set_order.argtypes = [i32]
        self.lib.emu_set_dry_run.argtypes = [i32]

    def call(self, name, *args):
        buf = ctypes.create_string_buffer(2048)
        if getattr(self.lib, name)(*args, buf, len(buf)) != 0:
            raise EmulatorFault(buf.value.decode())

    def order(self, name):
        self.lib.emu_set_order(ORDERS[name])


class Guarded:
    """A C-contiguous copy of `values` between two guard bands of 0xff bytes (NaN for floats).

    The values start on a 64-byte boundary (as cudaMalloc's, which wmma's alignment rules assume)."""

    PAD = 64

    def __init__(self, values):
        values = np.ascontiguousarray(values)
        self.shape, self.dtype = values.shape, values.dtype
        n, size = values.size + 2 * self.PAD, values.dtype.itemsize
        raw = np.empty(n * size + 64, dtype=np.uint8)
        shift = (-(raw.ctypes.data + self.PAD * size)) % 64
        self.buf = raw[shift:shift + n * size].view(values.dtype)
        self.buf.view(np.uint8)[:] = 0xFF
        self.buf[self.PAD:self.PAD + values.size] = values.ravel()

    @classmethod
    def poisoned(cls, shape, dtype):
        g = cls(np.zeros(shape, dtype))
        g.buf.view(np.uint8)[:] = 0xFF
        return g

    @property
    def ptr(self):
        return self.buf.ctypes.data + self.PAD * self.buf.itemsize

    def value(self):
        return self.buf[self.PAD:self.buf.size - self.PAD].reshape(self.shape).copy()

    def intact(self):
        ends = np.concatenate([self.buf[:self.PAD], self.buf[self.buf.size - self.PAD:]]).view(np.uint8)
        return bool((ends == 0xFF).all())


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return Emulated(CSRC, tmp_path_factory.mktemp("emu"))


# ----------------------------------------------------------------------------- the emulator itself

def test_emulator_reports_a_barrier_that_some_threads_skip(emu):
    out = np.zeros(32, np.int32)
    with pytest.raises(EmulatorFault, match="divergent barrier"):
        emu.call("emu_selftest", 0, None, None, out.ctypes.data)


def test_emulator_rejects_a_grid_beyond_the_hardware_limits(emu):
    with pytest.raises(EmulatorFault, match="invalid configuration argument: grid"):
        emu.call("emu_selftest", 2, None, None, None)


@pytest.mark.parametrize("order", ORDERS)
def test_emulator_shuffles(emu, order):
    emu.order(order)
    out = np.zeros((32, 4), np.int32)
    emu.call("emu_selftest", 1, None, None, out.ctypes.data)
    lane = np.arange(32)
    assert (out[:, 0] == lane ^ 5).all()
    assert (out[:, 1] == np.where(lane + 3 < 32, lane + 3, lane)).all()
    assert (out[:, 2] == np.where(lane >= 3, lane - 3, lane)).all()
    assert (out[:, 3] == 7).all()


def test_emulator_wmma_bf16_matches_float64(emu):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    bits = lambda t: np.ascontiguousarray(t.view(torch.int16).numpy().view(np.uint16))  # noqa: E731
    a_bits, b_cols = Guarded(bits(a)), Guarded(bits(b.t().contiguous()))  # B is read column-major
    c = Guarded.poisoned((16, 16), np.float32)
    emu.call("emu_selftest", 3, a_bits.ptr, b_cols.ptr, c.ptr)
    out = c.value()
    truth = a.double() @ b.double()
    # bf16 products are exact in fp32; only the fp32 sums of 16 terms round
    assert np.abs(out - truth.numpy()).max() < 16 * 2 ** -23 * truth.abs().max().item() + 1e-6


# ----------------------------------------------------------------------------- sinkhorn

def emulated_sinkhorn(emu, scores, epsilon, n_iters, max_blocks, max_shared):
    """common.ops._sinkhorn_compiled's driver on the emulated CUDA kernels (one process)."""
    B, K = scores.shape
    codes = {torch.float32: (0, np.float32), torch.float16: (1, np.uint16), torch.bfloat16: (2, np.uint16),
             torch.float64: (3, np.float64)}
    code, np_type = codes[scores.dtype]
    raw = scores.view(torch.int16) if np_type is np.uint16 else scores
    s = Guarded(raw.numpy().view(np_type))
    colmax = Guarded(scores.amax(dim=0).float().numpy())
    q = Guarded.poisoned((B, K), np.float32)
    colsum = Guarded.poisoned((K,), np.float64)
    ws = Guarded.poisoned((max(1, emu.lib.emu_sinkhorn_workspace(B, K, max_blocks, max_shared)),), np.float64)
    emu.call("emu_sinkhorn_init", code, s.ptr, colmax.ptr, 1.0 / epsilon, B, K, q.ptr, colsum.ptr, ws.ptr,
             max_blocks, max_shared)
    for _ in range(n_iters - 1):
        u = Guarded(1.0 / colsum.value())
        emu.call("emu_sinkhorn_step", q.ptr, u.ptr, B, K, colsum.ptr, ws.ptr, max_blocks, max_shared)
        assert u.intact()
    u = Guarded(1.0 / colsum.value())
    emu.call("emu_sinkhorn_finish", q.ptr, u.ptr, B, K, max_blocks, max_shared)
    for name, g in [("scores", s), ("colmax", colmax), ("Q", q), ("column sums", colsum), ("workspace", ws), ("u", u)]:
        assert g.intact(), f"a kernel wrote outside {name}"
    return torch.from_numpy(q.value())


def check_sinkhorn(emu, shape, dtype, placement, epsilon=0.05, n_iters=3):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    scores = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1).to(dtype)
    max_blocks, max_shared = {"shared": (4, H100_SHARED), "global": (3, 256)}[placement]
    out = emulated_sinkhorn(emu, scores, epsilon, n_iters, max_blocks, max_shared)
    truth = ops.sinkhorn_reference(scores.double(), epsilon, n_iters)
    naive = ops.sinkhorn_reference(scores.float(), epsilon, n_iters)  # PyTorch in float32, same inputs
    assert torch.isfinite(out).all()
    err, naive_err = (out.double() - truth).abs().max().item(), (naive.double() - truth).abs().max().item()
    assert err <= naive_err + F32_TOL, (err, naive_err)
    assert torch.allclose(out.sum(1).double(), torch.ones(shape[0], dtype=torch.float64), atol=1e-5)
    return out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 37), (37, 3), (45, 301), (19, 600)])
@pytest.mark.parametrize("placement", ["shared", "global"])
def test_sinkhorn_matches_float64(emu, order, shape, placement):
    emu.order(order)
    check_sinkhorn(emu, shape, torch.float32, placement)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sinkhorn_input_dtypes(emu, dtype):
    emu.order("high-first")
    check_sinkhorn(emu, (23, 57), dtype, "shared")


def test_sinkhorn_extreme_ratio_stays_finite(emu):
    """scores/eps up to ~400 (SwAV's exp overflows fp32): as tests/test_ops.py on the CPU kernel."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(37, 11, generator=g) * 4 - 2
    out = emulated_sinkhorn(emu, scores, 0.005, 3, 4, H100_SHARED)
    truth = ops.sinkhorn_reference(scores.double(), 0.005, 3)
    assert torch.isfinite(out).all()
    assert (out.double() - truth).abs().max().item() < 1e-4


def test_sinkhorn_does_not_depend_on_scheduling(emu):
    """Column sums are added in a fixed order: both scheduling orders give the same bits."""
    scores = F.normalize(torch.randn(45, 301, generator=torch.Generator().manual_seed(1)), dim=1)
    outs = []
    for order in ORDERS:
        emu.order(order)
        outs.append(emulated_sinkhorn(emu, scores, 0.05, 3, 4, H100_SHARED))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("rows", [4_194_305, 2 ** 31 - 1])
def test_sinkhorn_launches_for_any_batch(emu, rows):
    """Every launch's grid and shared memory fit the hardware limits at any B (checked, not run)."""
    emu.lib.emu_set_dry_run(1)
    try:
        for k, max_shared in [(3000, H100_SHARED), (65536, H100_SHARED)]:
            emu.call("emu_sinkhorn_init", 0, None, None, 20.0, rows, k, None, None, None, 264, max_shared)
            emu.call("emu_sinkhorn_step", None, None, rows, k, None, None, 264, max_shared)
            emu.call("emu_sinkhorn_finish", None, None, rows, k, 264, max_shared)
    finally:
        emu.lib.emu_set_dry_run(0)


# ----------------------------------------------------------------------------- k-means

def emulated_assign(emu, x, c, spherical, tf32, max_shared=H100_SHARED):
    n, d = x.shape
    k = c.shape[0]
    gx, gc = Guarded(x.numpy()), Guarded(c.numpy())
    half_sq = None if spherical else Guarded((0.5 * (c * c).sum(1)).numpy())
    score, best = Guarded.poisoned((n,), np.float32), Guarded.poisoned((n,), np.int64)
    emu.call("emu_kmeans_assign", gx.ptr, gc.ptr, None if half_sq is None else half_sq.ptr, n, k, d, int(tf32),
             score.ptr, best.ptr, max_shared)
    for name, g in [("x", gx), ("centroids", gc), ("best score", score), ("best", best)] + (
            [] if half_sq is None else [("half_sq", half_sq)]):
        assert g.intact(), f"a kernel wrote outside {name}"
    return torch.from_numpy(score.value()), torch.from_numpy(best.value())


def check_assign(emu, n, k, d, spherical, tf32, max_shared=H100_SHARED, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    if spherical:
        x, c = F.normalize(x, dim=1), F.normalize(c, dim=1)
    score, best = emulated_assign(emu, x, c, spherical, tf32, max_shared)
    truth = x.double() @ c.double().t()
    if not spherical:
        truth = truth - 0.5 * (c.double() ** 2).sum(1)
    assert ((best >= 0) & (best < k)).all()
    chosen = truth.gather(1, best[:, None])[:, 0]
    scale = x.double().norm(dim=1) * c.double().norm(dim=1).max() + (0 if spherical else c.double().pow(2).sum(1).max())
    # fp32: the sum of d products rounds at most d times; TF32 rounds every input to 11 significant bits
    # before the product (relative 2^-11 each), so only the choice (not the score) may differ by that much
    fp32_tol = (d + 2) * 2.0 ** -24 * scale + 1e-30
    choice_tol = (3 * 2.0 ** -11 * scale + fp32_tol) if tf32 else fp32_tol
    assert (truth.max(1).values - chosen <= 2 * choice_tol).all(), "a centroid was chosen that is not the best"
    assert ((score.double() - chosen).abs() <= fp32_tol).all(), "the reported score is not the chosen centroid's"
    return score, best


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (130, 67, 33), (37, 130, 70), (129, 3, 5)])
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_assign_fp32_matches_float64(emu, order, n, k, d, spherical):
    emu.order(order)
    check_assign(emu, n, k, d, spherical, tf32=False)


@pytest.mark.parametrize("n,k,d", [(130, 67, 33), (37, 130, 70)])
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_assign_tf32(emu, n, k, d, spherical):
    emu.order("high-first")
    check_assign(emu, n, k, d, spherical, tf32=True)


@pytest.mark.parametrize("tf32", [False, True])
def test_kmeans_assign_streams_x_when_it_does_not_fit(emu, tf32):
    """D too large to keep the block's rows in shared memory: x is streamed with the centroids."""
    check_assign(emu, 131, 70, 33, spherical=True, tf32=tf32, max_shared=70_000)


def test_kmeans_assign_ties_go_to_the_lower_index(emu):
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]] * 20)  # 80 centroids: ties across tiles
    _, best = emulated_assign(emu, x, c, spherical=True, tf32=False)
    assert best.tolist() == [1, 0]


def emulated_update(emu, x, assign, k):
    n, d = x.shape
    gx, ga = Guarded(x.numpy()), Guarded(assign.numpy())
    sums, counts = Guarded.poisoned((k, d), np.float32), Guarded.poisoned((k,), np.float32)
    partial = Guarded.poisoned((max(1, emu.lib.emu_kmeans_max_pieces(n, k)), max(1, d)), np.float64)
    emu.call("emu_kmeans_update", gx.ptr, ga.ptr, n, k, d, sums.ptr, counts.ptr, partial.ptr)
    for name, g in [("x", gx), ("assign", ga), ("sums", sums), ("counts", counts), ("partial sums", partial)]:
        assert g.intact(), f"a kernel wrote outside {name}"
    return torch.from_numpy(sums.value()), torch.from_numpy(counts.value())


@pytest.mark.parametrize("order", ORDERS)
def test_kmeans_update_matches_float64(emu, order):
    """Uneven clusters (one of 600 rows: three pieces), empty ones, odd D."""
    emu.order(order)
    g = torch.Generator().manual_seed(3)
    n, k, d = 701, 9, 37
    x = torch.randn(n, d, generator=g) * 10
    assign = torch.randint(0, 5, (n,), generator=g)
    assign[:600] = 2
    sums, counts = emulated_update(emu, x, assign, k)
    truth = torch.zeros(k, d, dtype=torch.float64).index_add_(0, assign, x.double())
    assert torch.equal(counts, torch.bincount(assign, minlength=k).float())
    # float64 sums of at most 600 fp32 values, rounded once to fp32
    assert torch.allclose(sums.double(), truth, rtol=2 ** -24, atol=1e-9)


def test_kmeans_update_does_not_depend_on_scheduling(emu):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 19, generator=g)
    assign = torch.randint(0, 3, (300,), generator=g)
    outs = []
    for order in ORDERS:
        emu.order(order)
        outs.append(emulated_update(emu, x, assign, 3))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("n,k,d", [(1_281_167, 3000, 128), (1_281_167, 16000, 2048)])
def test_kmeans_launches_at_full_scale(emu, n, k, d):
    """ImageNet-sized k-means (DeepCluster-v2's 3000 x 128, ClusterFit's 16000 x 2048): configurations fit."""
    emu.lib.emu_set_dry_run(1)
    try:
        for tf32 in (0, 1):
            emu.call("emu_kmeans_assign", None, None, None, n, k, d, tf32, None, None, H100_SHARED)
    finally:
        emu.lib.emu_set_dry_run(0)


# ----------------------------------------------------------------------------- planted faults

def check_kmeans(emu):
    check_assign(emu, 130, 67, 33, spherical=False, tf32=False)


# (file, the exact text, what replaces it, the check that must fail): each a bug the emulator must catch
FAULTS = {
    "missing __syncthreads": (
        "kernels/compat.cuh",
        "  v = warp_sum(v);\n  __syncthreads();\n  if (lane == 0) red[warp] = v;",
        "  v = warp_sum(v);\n  if (lane == 0) red[warp] = v;",
        lambda emu: check_sinkhorn(emu, (45, 301), torch.float32, "shared")),
    "warp dropped from a reduction": (
        "kernels/compat.cuh",
        "v = lane < warps ? red[lane] : T(0);",
        "v = lane < warps - 1 ? red[lane] : T(0);",
        lambda emu: check_sinkhorn(emu, (45, 301), torch.float32, "shared")),
    "off-by-one loop bound": (
        "kernels/sinkhorn.cuh",
        "for (int64_t k = threadIdx.x; k < K; k += blockDim.x) dot += static_cast<double>(qr[k]) * sl.u[k];",
        "for (int64_t k = threadIdx.x; k <= K; k += blockDim.x) dot += static_cast<double>(qr[k]) * sl.u[k];",
        lambda emu: check_sinkhorn(emu, (45, 301), torch.float32, "shared")),
    "k-means: scores read before the tile is complete": (
        "kernels/kmeans.cuh",
        "    __syncthreads();  // every score of the tile is in sc\n",
        "",
        check_kmeans),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_planted_faults_are_caught(fault, tmp_path):
    """A copy of the kernels with one bug planted fails under at least one scheduling order."""
    name, text, planted, check = FAULTS[fault]
    for part in ("emu", "kernels"):
        shutil.copytree(CSRC / part, tmp_path / "src" / part)
    path = tmp_path / "src" / name
    source = path.read_text()
    assert source.count(text) == 1, f"{name} no longer contains the line this fault plants into"
    path.write_text(source.replace(text, planted))
    faulty = Emulated(tmp_path / "src", tmp_path)
    caught = []
    for order in ORDERS:
        faulty.order(order)
        try:
            check(faulty)
        except (EmulatorFault, AssertionError) as e:
            caught.append(f"{order}: {type(e).__name__}: {str(e)[:200]}")
    assert caught, f"the planted fault ({fault}) went unnoticed under both scheduling orders"
