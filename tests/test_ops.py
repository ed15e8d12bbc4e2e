"""Numerical tests of common/ops.py: the compiled kernels against the float64 references.

Rules: each kernel's error against the float64 truth is at most the naive PyTorch
code's error at the same precision plus a small stated tolerance; sizes are odd and
never multiples of the tile sizes; results do not depend on the tile size; GPU tests
set TF32 explicitly; k-means assignments are compared tie-tolerantly.
CUDA cases run the same checks and are skipped without a GPU.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common import ops
from tests.helpers import swav_sinkhorn

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
F32_TOL = 2e-5  # absolute slack on top of the naive float32 error (probabilities, losses of O(1-10))


@pytest.fixture(autouse=True)
def _no_tf32():
    """GPU tests compare fp32 kernels with fp32 PyTorch: TF32 off, set explicitly."""
    if CUDA:
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def test_extension_is_built():
    assert ops._C is not None, "common._C is not built: run `pip install --no-build-isolation -e .`"
    assert ops.backend("cpu") == "compiled-cpu"
    if CUDA:
        assert ops.backend("cuda") == "compiled-cuda"


# ----------------------------------------------------------------------------- sinkhorn

SINKHORN_CASES = [(1, 7), (7, 37), (37, 3), (1037, 301)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SINKHORN_CASES)
@pytest.mark.parametrize("epsilon", [0.05, 0.005])
@pytest.mark.parametrize("n_iters", [1, 3])
def test_sinkhorn_matches_float64(device, shape, epsilon, n_iters):
    g = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    scores = F.normalize(torch.randn(*shape, generator=g), dim=1).to(device)  # cosine scores, as in SwAV
    truth = ops.sinkhorn_reference(scores.double(), epsilon, n_iters)
    out = ops.sinkhorn(scores, epsilon, n_iters)
    naive = ops.sinkhorn_reference(scores, epsilon, n_iters)  # PyTorch, float32
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.isfinite(out).all()
    err, naive_err = (out.double() - truth).abs().max().item(), (naive.double() - truth).abs().max().item()
    assert err <= naive_err + F32_TOL, (err, naive_err)
    assert torch.allclose(out.sum(1).double(), torch.ones(shape[0], dtype=torch.float64, device=device), atol=1e-5)
    if epsilon == 0.05:  # SwAV's formula does not overflow here: same result
        assert torch.allclose(out.double(), swav_sinkhorn(scores.double(), epsilon, n_iters), atol=F32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_extreme_ratio_stays_finite(device):
    """scores/eps up to ~400: SwAV's exp overflows fp32 (> 88), ours must not."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(37, 11, generator=g) * 4 - 2).to(device)
    eps = 0.005
    with torch.no_grad():
        assert not torch.isfinite(swav_sinkhorn(scores, eps, 3)).all()  # the naive formula breaks
    out = ops.sinkhorn(scores, eps, 3)
    truth = ops.sinkhorn_reference(scores.double(), eps, 3)
    assert torch.isfinite(out).all()
    assert (out.double() - truth).abs().max().item() < 1e-4
    assert torch.allclose(out.sum(1).double(), torch.ones(37, dtype=torch.float64, device=device), atol=1e-5)


def test_sinkhorn_recycled_output_buffers_are_never_shared():
    """Outputs of 8 MB and more come from a one-slot cache of freed buffers (csrc/memory.h):
    a live result must never be overwritten, and a recycled buffer must be fully rewritten."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(701, 3001, generator=g) for _ in range(3))
    qa = ops.sinkhorn(a, 0.05, 3)
    kept = qa.clone()
    qb = ops.sinkhorn(b, 0.05, 3)
    assert qa.data_ptr() != qb.data_ptr() and torch.equal(qa, kept)
    freed = qb.data_ptr()
    del qb
    qc = ops.sinkhorn(c, 0.05, 3)
    truth = ops.sinkhorn_reference(c.double(), 0.05, 3)
    assert torch.equal(qa, kept) and (qc.double() - truth).abs().max() < 1e-5
    if ops.backend("cpu") == "compiled-cpu" and os.environ.get("SSL_OPS_NO_HUGEPAGES") != "1":
        assert qc.data_ptr() == freed  # the freed buffer was reused


@pytest.mark.parametrize("shape", [(1, 1), (7, 37), (37, 3), (1037, 301)])
def test_column_max_cpu_equals_amax_with_nan_and_inf(shape):
    """The CPU kernel's column max (Sinkhorn's shift) is torch.amax, a NaN propagating (AVX2 and, through
    test_scalar_and_fp32_fallbacks_pass_the_same_tests, scalar)."""
    g = torch.Generator().manual_seed(shape[0])
    scores = torch.randn(*shape, generator=g)
    assert torch.equal(ops._C.column_max(scores), scores.amax(dim=0))
    scores[-1, 0], scores[0, -1] = float("nan"), float("inf")
    scores[shape[0] // 2, shape[1] // 2] = float("-inf")
    got, want = ops._C.column_max(scores), scores.amax(dim=0)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_sinkhorn_thread_count_does_not_matter():
    scores = F.normalize(torch.randn(1037, 301, generator=torch.Generator().manual_seed(1)), dim=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sinkhorn(scores, 0.05, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(one, ops.sinkhorn(scores, 0.05, 3), atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sinkhorn_half_cuda(dtype):
    scores = F.normalize(torch.randn(1037, 301, device="cuda"), dim=1).to(dtype)
    out = ops.sinkhorn(scores, 0.05, 3)
    assert out.dtype == dtype
    truth = ops.sinkhorn_reference(scores.double(), 0.05, 3)
    assert (out.double() - truth).abs().max().item() < 1e-2


# ----------------------------------------------------------------------------- contrastive

def contrastive_inputs(n, m, d, seed, device, simclr=False):
    g = torch.Generator().manual_seed(seed)
    if simclr:  # queries are the local views, keys the same views: positive = the other view
        assert n == m and n % 2 == 0
        z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
        q, k = z, z.clone()
        pos = (torch.arange(n) + n // 2) % n
        self_index = torch.arange(n)
    else:
        q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
        k = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
        pos = torch.randint(0, m, (n,), generator=g)
        self_index = (pos + 1 + torch.randint(0, m - 1, (n,), generator=g)) % m
    return q.to(device), k.to(device), pos.to(device), self_index.to(device)


def loss_and_grads(fn, q, k, pos, temperature, self_index, dtype, reduction="sum"):
    qq = q.detach().to(dtype).requires_grad_()
    kk = k.detach().to(dtype).requires_grad_()
    per_row = fn(qq, kk, pos, temperature, self_index=self_index, reduction="none")
    (per_row.sum() if reduction == "sum" else per_row.mean()).backward()
    return per_row.detach().double(), qq.grad.double(), kk.grad.double()


CONTRASTIVE_CASES = [(1, 7, 5), (7, 37, 11), (37, 1, 3), (37, 37, 16), (1037, 1101, 19)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,d", CONTRASTIVE_CASES)
@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("with_self", [True, False])
def test_contrastive_matches_float64(device, n, m, d, temperature, with_self):
    if m == 1:
        m, with_self = 2, False
    q, k, pos, self_index = contrastive_inputs(n, m, d, n * 7 + m, device)
    self_index = self_index if with_self else None
    truth = loss_and_grads(ops.contrastive_loss_reference, q, k, pos, temperature, self_index, torch.float64)
    naive = loss_and_grads(ops.contrastive_loss_reference, q, k, pos, temperature, self_index, torch.float32)
    ours = loss_and_grads(ops.contrastive_loss, q, k, pos, temperature, self_index, torch.float32)
    for name, o, nv, t in zip(("loss", "dq", "dk"), ours, naive, truth):
        err, naive_err = (o - t).abs().max().item(), (nv - t).abs().max().item()
        scale = max(1.0, t.abs().max().item())
        assert err <= naive_err + F32_TOL * scale, (name, err, naive_err)


@pytest.mark.parametrize("device", DEVICES)
def test_contrastive_simclr_layout(device):
    q, k, pos, self_index = contrastive_inputs(74, 74, 13, 3, device, simclr=True)
    for reduction in ("mean", "sum", "none"):
        ours = ops.contrastive_loss(q.float(), k.float(), pos, 0.1, self_index, reduction)
        ref = ops.contrastive_loss_reference(q, k, pos, 0.1, self_index, reduction)
        assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_contrastive_tile_size_does_not_matter(device, monkeypatch):
    q, k, pos, self_index = contrastive_inputs(1037, 1101, 19, 5, device)
    truth = loss_and_grads(ops.contrastive_loss_reference, q, k, pos, 0.05, self_index, torch.float64)
    naive = loss_and_grads(ops.contrastive_loss_reference, q, k, pos, 0.05, self_index, torch.float32)
    default = loss_and_grads(ops.contrastive_loss, q, k, pos, 0.05, self_index, torch.float32)
    for tiles in [(1, 7), (37, 101), (300, 1101), (4096, 4096)]:
        monkeypatch.setattr(ops, "_TILES", tiles)
        tiled = loss_and_grads(ops.contrastive_loss, q, k, pos, 0.05, self_index, torch.float32)
        for name, a, b, nv, t in zip(("loss", "dq", "dk"), tiled, default, naive, truth):
            # each tiling is as accurate as the untiled float32 reference, and the tilings agree to float32
            # rounding relative to the largest entry (a gradient entry near zero is a sum with cancellation,
            # so an entrywise relative bound would measure summation order, not correctness)
            scale = max(1.0, t.abs().max().item())
            assert (a - t).abs().max() <= (nv - t).abs().max() + F32_TOL * scale, (tiles, name)
            assert (a - b).abs().max() <= 1e-5 * scale, (tiles, name)


@pytest.mark.parametrize("device", DEVICES)
def test_contrastive_moco_queue_gets_no_gradient(device):
    q, k, pos, _ = contrastive_inputs(37, 101, 16, 9, device)
    qq = q.float().requires_grad_()
    keys = k.float()  # [k; queue] with requires_grad=False
    ops.contrastive_loss(qq, keys, pos, 0.2).backward()
    assert keys.grad is None and torch.isfinite(qq.grad).all()
    qd = q.clone().requires_grad_()
    ops.contrastive_loss_reference(qd, k, pos, 0.2).backward()
    assert torch.allclose(qq.grad.double(), qd.grad, atol=1e-6)


def test_contrastive_gradcheck_float64_kernel():
    """gradcheck of the compiled autograd.Function (its CPU kernel also runs in float64)."""
    q, k, pos, self_index = contrastive_inputs(7, 13, 5, 11, "cpu")
    q.requires_grad_()
    k.requires_grad_()

    def fn(qq, kk):
        return ops._ContrastiveLoss.apply(qq, kk, pos, self_index, 0.3, (3, 4))

    assert torch.autograd.gradcheck(fn, (q, k), eps=1e-6, atol=1e-6)
    out = fn(q, k)
    assert torch.allclose(out, ops.contrastive_loss_reference(q, k, pos, 0.3, self_index, "none"), atol=1e-12)


def symmetric_inputs(n, d, seed, simclr, device="cpu"):
    """contrastive_loss(z, z, ...) as SimCLR calls it on one process, or with arbitrary indices."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    if simclr:
        pos, self_index = (torch.arange(n) + n // 2) % n, torch.arange(n)
    else:
        pos = torch.randint(0, n, (n,), generator=g)
        self_index = (pos + 1 + torch.randint(0, n - 1, (n,), generator=g)) % n
    return z.to(device), pos.to(device), self_index.to(device)


def symmetric_loss_and_grad(fn, z, pos, temperature, self_index, dtype):
    zz = z.detach().to(dtype).requires_grad_()
    per_row = fn(zz, zz, pos, temperature, self_index=self_index, reduction="none")
    (per_row * torch.linspace(0.5, 1.5, len(zz), dtype=dtype, device=zz.device)).sum().backward()  # uneven weights
    return per_row.detach().double(), zz.grad.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,simclr", [(2, 3, True), (7, 5, False), (38, 16, True), (1037, 19, False),
                                        (1102, 13, True)])
@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.01])
@pytest.mark.parametrize("with_self", [True, False])
def test_contrastive_symmetric_matches_float64(device, n, d, simclr, temperature, with_self):
    """keys is queries (SimCLR on one process) takes the symmetric path (CPU: half the tiles; CUDA: the dz kernel)."""
    z, pos, self_index = symmetric_inputs(n, d, n + d, simclr, device)
    self_index = self_index if with_self else None
    truth = symmetric_loss_and_grad(ops.contrastive_loss_reference, z, pos, temperature, self_index, torch.float64)
    naive = symmetric_loss_and_grad(ops.contrastive_loss_reference, z, pos, temperature, self_index, torch.float32)
    ours = symmetric_loss_and_grad(ops.contrastive_loss, z, pos, temperature, self_index, torch.float32)
    for name, o, nv, t in zip(("loss", "dz"), ours, naive, truth):
        err, naive_err = (o - t).abs().max().item(), (nv - t).abs().max().item()
        scale = max(1.0, t.abs().max().item())
        assert err <= naive_err + F32_TOL * scale, (name, err, naive_err)


def test_contrastive_symmetric_tile_size_does_not_matter(monkeypatch):
    z, pos, self_index = symmetric_inputs(1037, 19, 5, False)
    default = symmetric_loss_and_grad(ops.contrastive_loss, z, pos, 0.05, self_index, torch.float32)
    for tile in [1, 7, 300, 4096]:
        monkeypatch.setattr(ops, "_TILES", (tile, 0))
        tiled = symmetric_loss_and_grad(ops.contrastive_loss, z, pos, 0.05, self_index, torch.float32)
        for a, b in zip(tiled, default):  # fp32 sums in another order: rounding relative to the largest entry
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item()), tile


def test_contrastive_symmetric_gradcheck_float64_kernel():
    for simclr in (True, False):
        z, pos, self_index = symmetric_inputs(10, 5, 11, simclr)
        z.requires_grad_()

        def fn(zz):
            return ops._SymmetricContrastiveLoss.apply(zz, pos, self_index, 0.3, 3)

        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)
        assert torch.allclose(fn(z), ops.contrastive_loss_reference(z, z, pos, 0.3, self_index, "none"), atol=1e-12)


@pytest.mark.skipif(not CUDA, reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_half_cuda(dtype):
    q, k, pos, self_index = contrastive_inputs(1037, 1101, 64, 13, "cuda")
    truth = loss_and_grads(ops.contrastive_loss_reference, q.to(dtype).double(), k.to(dtype).double(), pos, 0.1,
                           self_index, torch.float64)
    naive = loss_and_grads(ops.contrastive_loss_reference, q, k, pos, 0.1, self_index, dtype)
    ours = loss_and_grads(ops.contrastive_loss, q, k, pos, 0.1, self_index, dtype)
    for o, nv, t in zip(ours, naive, truth):
        assert (o - t).abs().max().item() <= 2 * (nv - t).abs().max().item() + 1e-2


@pytest.mark.skipif(not CUDA, reason="no GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_symmetric_half_cuda(dtype):
    """keys is queries in 16 bits: the dz kernel against float64 on the rounded inputs, within twice the
    plain formula's error in that dtype."""
    z, pos, self_index = symmetric_inputs(1102, 64, 17, True, "cuda")
    truth = symmetric_loss_and_grad(ops.contrastive_loss_reference, z.to(dtype).double(), pos, 0.1, self_index,
                                    torch.float64)
    naive = symmetric_loss_and_grad(ops.contrastive_loss_reference, z, pos, 0.1, self_index, dtype)
    ours = symmetric_loss_and_grad(ops.contrastive_loss, z, pos, 0.1, self_index, dtype)
    for o, nv, t in zip(ours, naive, truth):
        assert (o - t).abs().max().item() <= 2 * (nv - t).abs().max().item() + 1e-2


def clustered_moco_batch(n, m, d, seed):
    """Unit queries and keys around 16 random centres (same-centre cosine ~0.7), the first n keys each query's
    positive (cosine ~0.99): most of the softmax mass sits on negatives, so their share of dq is large."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(16, d, generator=g, dtype=torch.float64), dim=1)

    def around(count):
        return centres[torch.randint(0, 16, (count,), generator=g)] + 0.6 * torch.randn(
            count, d, generator=g, dtype=torch.float64) / d ** 0.5

    q = F.normalize(around(n), dim=1)
    k = F.normalize(torch.cat([q + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64) / d ** 0.5,
                               around(m - n)]), dim=1)
    return q, k, torch.arange(n)


MOCO_SCALE_CASES = [("cpu", torch.float32, 517, 8209, 2e-5)] + [
    pytest.param("cuda", dtype, 4096, 65536, tol, marks=pytest.mark.skipif(not CUDA, reason="no GPU"))
    for dtype, tol in [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)]]


@pytest.mark.parametrize("device,dtype,n,m,tol", MOCO_SCALE_CASES)
def test_contrastive_moco_scale_keeps_the_negatives_share(device, dtype, n, m, tol):
    """MoCo's loss at its shape (on CUDA 4096 queries x 65536 keys in 16 bits, the mean over the rows, keys without
    gradient): dL/dlogit of a negative is about p_j / n, 1e-9 to 4e-8 here, below fp16's smallest subnormal
    (6e-8), so a kernel that casts it to fp16 unscaled loses the negatives' share of dq (the plain formula in fp16
    loses it too, so it is no bar here). dq's relative error against float64 on the rounded inputs is at most tol:
    fp16 with the cast scaled rounds to about 4e-4, unscaled misses by 0.42; bf16 rounds to about 2e-3; dropping the
    negatives' share altogether would miss by about 1.1 (checked below)."""
    q, k, pos = clustered_moco_batch(n, m, 128, 29)
    q, k, pos = q.to(device), k.to(device), pos.to(device)
    t = 0.2

    def run(fn, work_dtype):
        qq = q.to(dtype).to(work_dtype).requires_grad_()
        loss = fn(qq, k.to(dtype).to(work_dtype), pos, t, reduction="none")
        loss.mean().backward()
        return loss.detach().double(), qq.grad.double()

    truth_loss, truth = run(ops.contrastive_loss_reference, torch.float64)
    ours_loss, ours = run(ops.contrastive_loss, dtype)

    def rel(a):
        return ((a - truth).norm() / truth.norm()).item()

    positives_only = -k[:n].to(dtype).double() / (t * n)  # dq without the softmax term
    assert rel(positives_only) > 0.3  # the data give the negatives a large share
    assert rel(ours) <= tol, rel(ours)
    assert (ours_loss - truth_loss).abs().max() <= tol * truth_loss.abs().max()


# ----------------------------------------------------------------------------- k-means

def clustered(n, d, centers, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    x = c[torch.randint(0, centers, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x.to(device)


def kmeans_scores(x, centroids, spherical):
    x, c = x.double(), centroids.double()
    if spherical:
        return F.normalize(x, dim=1) @ F.normalize(c, dim=1).t()
    return x @ c.t() - 0.5 * (c * c).sum(1)


def assert_assignments_are_argmax(x, centroids, assignments, spherical, tol=1e-4):
    scores = kmeans_scores(x, centroids, spherical)
    best = scores.max(dim=1).values
    chosen = scores.gather(1, assignments[:, None])[:, 0]
    scale = 1.0 if spherical else max(1.0, best.abs().max().item())
    assert (chosen >= best - tol * scale).all()


def objective(x, centroids, spherical):
    """Sum of squared distances to the nearest centroid (on the unit sphere when spherical)."""
    x, c = x.double(), centroids.double()
    if spherical:
        x, c = F.normalize(x, dim=1), F.normalize(c, dim=1)
    return torch.cdist(x, c).min(dim=1).values.pow(2).sum().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,d,k", [(7, 3, 1), (37, 5, 7), (1037, 19, 37)])
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_matches_reference(device, n, d, k, spherical):
    x = clustered(n, d, max(1, k // 2), n + k, device)
    centroids, assignments = ops.kmeans(x, k, n_iters=5, spherical=spherical, seed=3)
    ref_c, ref_a = ops.kmeans_reference(x.double(), k, n_iters=5, spherical=spherical, seed=3)
    assert centroids.shape == (k, d) and assignments.shape == (n,) and assignments.dtype == torch.int64
    assert torch.isfinite(centroids).all()
    assert_assignments_are_argmax(x, centroids, assignments, spherical)
    assert torch.bincount(assignments, minlength=k).min() > 0, "empty cluster"
    if spherical:
        assert torch.allclose(centroids.norm(dim=1), torch.ones(k, device=device), atol=1e-5)
    assert objective(x, centroids, spherical) <= objective(x, ref_c, spherical) * (1 + 1e-4) + 1e-6
    assert torch.allclose(centroids.double(), ref_c, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_reseeds_empty_clusters(device, spherical):
    x = clustered(101, 4, 3, 0, device)
    init = torch.cat([x[:5], torch.full((2, 4), 1e3, device=device), -torch.full((1, 4), 1e3, device=device)])
    if spherical:  # two copies of the same direction: one of them is empty after the first assignment
        init[5] = init[0]
    centroids, assignments = ops.kmeans(x, 8, n_iters=3, spherical=spherical, init=init)
    ref_c, ref_a = ops.kmeans_reference(x.double(), 8, n_iters=3, spherical=spherical, init=init.double())
    assert torch.isfinite(centroids).all()
    assert torch.bincount(assignments, minlength=8).min() > 0
    assert torch.allclose(centroids.double(), ref_c, atol=1e-4)
    assert_assignments_are_argmax(x, centroids, assignments, spherical)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kmeans_reseeds_with_the_farthest_point(device, dtype):
    """Euclidean: farthest means largest |x - c|, not lowest x.c - |c|^2/2 (which only ranks centroids for one
    row); spherical: lowest cosine, and an all-zero row (no direction) is never a centroid."""
    x = torch.tensor([[49.0], [51.0], [200.0]], dtype=dtype, device=device)
    init = torch.tensor([[50.0], [1e6]], dtype=dtype, device=device)  # the second is empty after one assignment
    centroids, assignments = ops.kmeans(x, 2, n_iters=1, spherical=False, init=init)
    assert centroids[:, 0].tolist() == [100.0, 200.0] and assignments.tolist() == [0, 0, 1]
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 0.0]], dtype=dtype, device=device)
    init = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=dtype, device=device)
    centroids, assignments = ops.kmeans(x, 2, n_iters=2, init=init)
    assert torch.allclose(centroids.norm(dim=1).double(), torch.ones(2, dtype=torch.float64, device=device))
    assert assignments[:2].tolist() == [0, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1e3, -3e4])
def test_kmeans_euclidean_far_from_the_origin(device, offset):
    """Every row's assignment is its nearest returned centroid, in float64 distances, wherever the data sit."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2003, 29, generator=gen) + offset).to(device)
    for fn in (ops.kmeans, ops.kmeans_reference):
        centroids, assignments = fn(x, 21, n_iters=5, spherical=False, seed=0)
        d2 = torch.cdist(x.double() - offset, centroids.double() - offset).pow(2)
        excess = d2.gather(1, assignments[:, None])[:, 0] - d2.min(dim=1).values
        assert excess.max().item() <= 1e-3 * d2.min(dim=1).values.mean().item()  # fp32 rounding of |x - c|^2 ~ 28
        ref_c, ref_a = ops.kmeans_reference(x.double(), 21, n_iters=5, spherical=False, seed=0)
        assert (assignments == ref_a).float().mean() > 0.99
        assert torch.allclose(centroids.double(), ref_c, atol=1e-3 + 1e-6 * abs(offset))  # fp32 ulp: 6e-8 x offset


@pytest.mark.skipif(not CUDA, reason="no GPU")
@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_tf32_cuda(spherical):
    """tf32=True: TF32 scores pick the centroid, within TF32's rounding of the fp32 best; deterministic."""
    x = clustered(4099, 67, 20, 7, "cuda")
    c1, a1 = ops.kmeans(x, 53, n_iters=4, spherical=spherical, seed=1, tf32=True)
    c2, a2 = ops.kmeans(x, 53, n_iters=4, spherical=spherical, seed=1, tf32=True)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    xd, cd = x.double(), c1.double()
    if spherical:
        xd, cd = F.normalize(xd, dim=1), F.normalize(cd, dim=1)
    scores = xd @ cd.t() - (0 if spherical else 0.5 * (cd * cd).sum(1))
    chosen = scores.gather(1, a1[:, None])[:, 0]
    scale = xd.norm(dim=1) * cd.norm(dim=1).max() + (0 if spherical else (cd * cd).sum(1).max())
    assert (scores.max(1).values - chosen <= 2 * (3 * 2.0 ** -11 + 70 * 2.0 ** -24) * scale).all()


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_objective_close_to_faiss(spherical):
    faiss = pytest.importorskip("faiss")
    n, d, k, iters = 2011, 16, 37, 10
    x = clustered(n, d, 20, 5)
    if spherical:
        x = F.normalize(x, dim=1)
    init = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]].clone()
    centroids, _ = ops.kmeans(x, k, n_iters=iters, spherical=spherical, init=init)
    km = faiss.Kmeans(d, k, niter=iters, spherical=spherical, seed=0, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=10**7)
    km.train(x.numpy(), init_centroids=init.numpy())
    ours, theirs = objective(x, centroids, spherical), objective(x, torch.from_numpy(km.centroids), spherical)
    assert ours <= theirs * 1.01, (ours, theirs)


def test_kmeans_random_init_is_seeded():
    x = clustered(1037, 8, 5, 1)
    a = ops.kmeans(x, 11, n_iters=0, seed=7)[0]
    assert torch.equal(a, ops.kmeans(x, 11, n_iters=0, seed=7)[0])
    assert not torch.equal(a, ops.kmeans(x, 11, n_iters=0, seed=8)[0])
    rows = torch.randperm(1037, generator=torch.Generator().manual_seed(7))[:11]
    assert torch.allclose(a, F.normalize(x[rows], dim=1), atol=1e-6)


BF16_CPU = ops._C is not None and ops._C.cpu_has_bf16_dot()


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bf16 dot products (the screened assignment is off)")
@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("n,d,k,scale", [(1, 16, 1, 1.0), (1037, 129, 257, 1.0), (2011, 37, 611, 1e3)])
def test_kmeans_screened_assignment_is_the_exact_argmax(n, d, k, scale, spherical):
    """The bf16 shortlist must never drop the best centroid: near-ties far below bf16's
    resolution (centroids 1e-4 apart), odd sizes, large magnitudes; checked against float64."""
    g = torch.Generator().manual_seed(n + k)
    base = torch.randn(max(1, k // 8), d, generator=g)
    c = (base.repeat(9, 1)[:k] + 1e-4 * torch.randn(k, d, generator=g)) * scale
    x = (base[torch.randint(0, base.shape[0], (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)) * scale
    if spherical:
        x, c = F.normalize(x, dim=1), F.normalize(c, dim=1)
    score, assign = ops._C.kmeans_assign_screened(x, x.bfloat16(), x.norm(dim=1), c, spherical, 97)
    truth = x.double() @ c.double().t() - (0 if spherical else 0.5 * (c.double() ** 2).sum(1))
    best = truth.max(dim=1).values
    chosen = truth.gather(1, assign[:, None])[:, 0]
    fp32_rounding = 4 * d * 2.0 ** -24 * (x.double().norm(dim=1) * c.double().norm(dim=1).max() + best.abs())
    assert (chosen >= best - fp32_rounding).all(), (best - chosen).max()
    assert (score.double() - chosen).abs().le(fp32_rounding).all()
    plain_score, plain = ops._C.kmeans_assign(x, c, spherical, 0)
    assert (truth.gather(1, plain[:, None])[:, 0] - chosen).abs().le(2 * fp32_rounding).all()


def test_scalar_and_fp32_fallbacks_pass_the_same_tests():
    """The kernels pick AVX2 code and (on bf16 CPUs) the screened k-means at run time; rerun
    the CPU op tests with both switched off so the portable code is checked too."""
    env = dict(os.environ, SSL_OPS_NO_SIMD="1", SSL_OPS_NO_BF16="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "cpu and not fallbacks and not screened"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("call", [
    lambda: ops.sinkhorn(torch.randn(3), 0.05),
    lambda: ops.sinkhorn(torch.randint(0, 3, (3, 4)), 0.05),
    lambda: ops.sinkhorn(torch.randn(3, 4), 0.0),
    lambda: ops.sinkhorn(torch.randn(3, 4), 0.05, n_iters=0),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long), 0.1),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=torch.long), 0.1),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long), 0.1),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.full((3,), 5), 0.1),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3), 0.1),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 0.1,
                                 self_index=torch.zeros(3, dtype=torch.long)),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), -1.0),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 0.1,
                                 reduction="max"),
    lambda: ops.kmeans(torch.randn(5, 3), 6),
    lambda: ops.kmeans(torch.randn(5, 3), 0),
    lambda: ops.kmeans(torch.randn(5, 3, 2), 2),
    lambda: ops.kmeans(torch.randn(5, 3), 2, init=torch.randn(3, 3)),
    lambda: ops.kmeans(torch.randn(5, 3), 2, init="kmeans++"),
    lambda: ops.kmeans(torch.randn(5, 3), 2, tf32="yes"),
    lambda: ops.kmeans(torch.randn(5, 3), 2.5),
    lambda: ops.kmeans(torch.randn(5, 3), 2, n_iters=math.inf),
    lambda: ops.kmeans(torch.randn(5, 3), 2, seed=2 ** 70),
    lambda: ops.kmeans(torch.randn(5, 3), 2, init=torch.ones(2, 3, dtype=torch.long)),
    lambda: ops.sinkhorn(torch.randn(3, 4), None),
    lambda: ops.sinkhorn(torch.randn(3, 4).to_sparse(), 0.05),
    lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), None),
])
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_mixed_devices_raise_value_error():
    with pytest.raises(ValueError):
        ops.contrastive_loss(torch.randn(3, 4, device="cuda"), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 1.)
    with pytest.raises(ValueError):
        ops.kmeans(torch.randn(5, 3, device="cuda"), 2, init=torch.randn(2, 3))
