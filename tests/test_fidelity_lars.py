"""Fidelity: optim.LARS against Apex's LARC(SGD), ClusterFit's k-means against VISSL's normalise-then-Euclidean.

The references are re-derived here in float64 from the original code's rules, written out step by step:
NVIDIA Apex's apex/parallel/LARC.py wrapped around torch.optim.SGD (as swav and VISSL use it), and VISSL's
tools/cluster_features_and_label.py (rows / (|row| + 1e-5), then faiss's Euclidean Lloyd k-means).
"""
import math

import pytest
import torch

import clusterfit
from common import optim

# ----------------------------------------------------------------------------- LARS = Apex LARC + SGD


class _LarcSgdReference:
    """Apex's LARC wrapped around SGD, one parameter at a time, in float64.

    LARC: for every group it takes the group's weight decay away from the inner SGD; a parameter with a
    gradient, a non-zero norm and a non-zero gradient norm gets g <- (g + wd * w) * local_lr with
    local_lr = trust * |w| / (|g| + |w| * wd + eps), in clip mode min(local_lr / lr, 1); any other
    parameter keeps its bare gradient. SGD (weight decay 0 now, dampening 0): buf = g on the first step,
    buf = momentum * buf + g after; the step uses buf (Nesterov: g + momentum * buf); w <- w - lr * step.
    Groups marked lars=False (ours only: LARC would adapt them) are plain SGD with their own weight decay.
    """

    def __init__(self, groups, momentum, nesterov, trust, eps, clip):
        self.groups = [dict(g, params=[p.detach().clone() for p in g["params"]]) for g in groups]
        self.momentum, self.nesterov, self.trust, self.eps, self.clip = momentum, nesterov, trust, eps, clip
        self.buffers = {}
        self.seen = {"clipped": 0, "unclipped": 0, "skipped": 0}

    def step(self, grads, lr):
        """grads: per group, per parameter, a float64 tensor or None (no gradient this step)."""
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            wd = group["weight_decay"]
            for pi, (w, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue
                g = g.clone()
                if group["lars"]:
                    w_norm, g_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
                    if w_norm != 0 and g_norm != 0:
                        local_lr = self.trust * w_norm / (g_norm + w_norm * wd + self.eps)
                        if self.clip:
                            scaled = local_lr / lr if lr != 0 else math.inf
                            self.seen["clipped" if scaled > 1 else "unclipped"] += 1
                            local_lr = min(scaled, 1.0)
                        g = (g + wd * w) * local_lr
                    else:
                        self.seen["skipped"] += 1
                elif wd:
                    g = g + wd * w  # the inner SGD's own decay
                if self.momentum:
                    key = (gi, pi)
                    if key not in self.buffers:
                        self.buffers[key] = g.clone()
                    else:
                        self.buffers[key] = self.momentum * self.buffers[key] + g
                    g = g + self.momentum * self.buffers[key] if self.nesterov else self.buffers[key]
                w -= lr * g


def _lars_problem():
    """Odd-shaped float64 parameters: two ordinary weights, a zero weight, a weight whose gradient is always
    zero, one whose gradient is zero on some steps and absent on another, and two excluded (lars=False) groups."""
    gen = torch.Generator().manual_seed(11)
    shapes = {"w1": (7, 5), "w2": (3, 4, 3), "zero_w": (5, 3), "dead": (4, 3), "flaky": (9,), "b": (7,),
              "decayed_plain": (6,)}
    params = {n: torch.nn.Parameter(torch.randn(*s, generator=gen, dtype=torch.float64)) for n, s in shapes.items()}
    with torch.no_grad():
        params["zero_w"].zero_()
    groups = [dict(params=[params[n] for n in ("w1", "w2", "zero_w", "dead", "flaky")], weight_decay=1e-3,
                   lars=True),
              dict(params=[params["b"]], weight_decay=0.0, lars=False),
              dict(params=[params["decayed_plain"]], weight_decay=5e-3, lars=False)]
    return params, groups, gen


def _lars_grads(params, gen, step):
    scale = {"w1": 1.0, "w2": 1e-3, "zero_w": 0.5, "dead": 0.0, "flaky": 2.0, "b": 1.0, "decayed_plain": 0.7}
    grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale[n] for n, p in params.items()}
    if step in (1, 3):
        grads["flaky"] = torch.zeros_like(grads["flaky"])
    if step == 2:
        grads["flaky"] = None  # no gradient at all: LARC and SGD skip it, its momentum buffer waits
    return grads


LRS = [0.0, 0.4, 1.3, 0.9, 0.05, 2.0]  # includes lr 0 (a warmup's first step) and rates on both sides of clipping


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("clip,momentum,nesterov,trust", [(False, 0.9, False, 0.001), (True, 0.9, False, 0.02),
                                                          (False, 0.9, True, 0.02), (True, 0.0, False, 0.001),
                                                          (True, 0.9, True, 0.5)])
def test_lars_steps_equal_apex_larc_sgd(clip, momentum, nesterov, trust, foreach):
    params, groups, gen = _lars_problem()
    reference = _LarcSgdReference(groups, momentum, nesterov, trust, 1e-8, clip)
    opt = optim.LARS(groups, lr=0.0, momentum=momentum, trust_coefficient=trust, clip=clip, nesterov=nesterov,
                     foreach=foreach)
    names = list(params)
    for step, lr in enumerate(LRS):
        grads = _lars_grads(params, gen, step)
        for n, p in params.items():
            p.grad = None if grads[n] is None else grads[n].clone()
        optim.set_lr(opt, lr)
        opt.step()
        reference.step([[grads[n] for n in ("w1", "w2", "zero_w", "dead", "flaky")], [grads["b"]],
                        [grads["decayed_plain"]]], lr)
        ours = [p.detach() for g in opt.param_groups for p in g["params"]]
        theirs = [p for g in reference.groups for p in g["params"]]
        for name, a, b in zip(names, ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} after step {step}")
    assert torch.equal(params["dead"].detach(), reference.groups[0]["params"][3])
    dead_start = _lars_problem()[0]["dead"].detach()
    assert torch.equal(params["dead"].detach(), dead_start)  # zero gradient: no decay, no move at all
    assert params["zero_w"].detach().abs().sum() > 0  # the zero weight took plain gradient steps
    assert reference.seen["skipped"] > 0
    if clip:  # the clip branch was taken both ways, so the test sees min(local_lr / lr, 1) on each side
        assert reference.seen["clipped"] > 0 and reference.seen["unclipped"] > 0, reference.seen


def test_lars_zero_gradient_parameter_is_left_alone_over_many_steps():
    """SwAV's recipe (lr 4.8 for 4096 images, wd 1e-6, momentum 0.9): 100 steps with an all-zero gradient
    leave the weight bit for bit as it was, as under Apex (decaying it would shrink it by ~0.4 %)."""
    w = torch.nn.Parameter(torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    start = w.detach().clone()
    opt = optim.LARS([dict(params=[w], weight_decay=1e-6, lars=True)], lr=4.8, momentum=0.9)
    for _ in range(100):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert torch.equal(w.detach(), start)


def _decayed_norm_lars_reference(groups, grads_per_step, lrs, momentum, trust):
    """The LARS of BYOL's optimizers.py and Barlow Twins' / VICReg's main.py, float64, one parameter at a time:
    for an adapted parameter d = g + wd * w, then d <- d * trust * |w| / |d| when |w| > 0 and |d| > 0 (else 1);
    an excluded parameter keeps d = g; buf = momentum * buf + d (buf starts at 0), w <- w - lr * buf."""
    weights = [[p.detach().clone() for p in g["params"]] for g in groups]
    buffers = {}
    for grads, lr in zip(grads_per_step, lrs):
        for gi, group in enumerate(groups):
            for pi, w in enumerate(weights[gi]):
                g = grads[gi][pi]
                if g is None:
                    continue
                d = g.clone()
                if group["lars"]:
                    d = d + group["weight_decay"] * w
                    w_norm, d_norm = math.sqrt(float((w * w).sum())), math.sqrt(float((d * d).sum()))
                    if w_norm > 0 and d_norm > 0:
                        d = d * (trust * w_norm / d_norm)
                buf = buffers.get((gi, pi), torch.zeros_like(w)) * momentum + d
                buffers[(gi, pi)] = buf
                w -= lr * buf
    return weights


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum,trust", [(0.9, 0.001), (0.0, 0.02)])
def test_decayed_norm_lars_equals_byol_and_barlow_twins_lars(momentum, trust, foreach):
    params, groups, gen = _lars_problem()
    groups = [groups[0], groups[1]]  # adapted (wd 1e-3) and excluded (no decay, no adaptation)
    order = [["w1", "w2", "zero_w", "dead", "flaky"], ["b"]]
    opt = optim.LARS(groups, lr=0.0, momentum=momentum, trust_coefficient=trust, foreach=foreach,
                     decayed_norm=True)
    steps = []
    for step, lr in enumerate(LRS):
        grads = _lars_grads(params, gen, step)
        steps.append([[grads[n] for n in names] for names in order])
        for n in (n for names in order for n in names):
            params[n].grad = None if grads[n] is None else grads[n].clone()
        optim.set_lr(opt, lr)
        opt.step()
    start, _, _ = _lars_problem()
    start_groups = [dict(g, params=[start[n] for n in names]) for g, names in zip(groups, order)]
    expected = _decayed_norm_lars_reference(start_groups, steps, LRS, momentum, trust)
    for names, group in zip(order, expected):
        for n, w in zip(names, group):
            torch.testing.assert_close(params[n].detach(), w, rtol=1e-12, atol=1e-14, msg=n)
    # unlike Apex's LARC, a zero gradient still decays the weight (d = wd * w, ratio trust / wd)
    assert not torch.equal(params["dead"].detach(), start["dead"].detach())


# ----------------------------------------------------------------------------- ClusterFit: VISSL's k-means


def _clusterfit_features(n=203, d=11, blobs=6, seed=3):
    """Non-negative (post-ReLU-like) pooled features: blobs of directions with norms spread over 0.01-30, so
    normalising changes which rows are close (raw Euclidean k-means would group rows by their norm)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(blobs, d, generator=gen, dtype=torch.float64) ** 3
    rows = centres[torch.arange(n) % blobs] + 0.03 * torch.rand(n, d, generator=gen, dtype=torch.float64)
    norms = torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(math.log(0.01), math.log(30.0), generator=gen))
    return rows / rows.norm(dim=1, keepdim=True) * norms


def _vissl_normalise(x):
    """tools/cluster_features_and_label.py: each row divided by (its L2 norm + 1e-5)."""
    return x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + 1e-5)


def _euclidean_lloyd(x, first, n_iters):
    """Lloyd's k-means as faiss runs it (Euclidean, centroid = mean of its rows), from the rows `first`;
    then the final assignment to the returned centroids (VISSL's index.search(x, 1)). float64 throughout.
    Returns (centroids, assignments, the smallest gap between a row's best and second-best squared distance)."""
    centroids = x[first].clone()
    smallest_gap = math.inf
    for it in range(n_iters + 1):
        distances = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(dim=2)
        two = distances.topk(2, dim=1, largest=False).values
        smallest_gap = min(smallest_gap, float((two[:, 1] - two[:, 0]).min()))
        assignments = distances.argmin(dim=1)
        if it == n_iters:
            return centroids, assignments, smallest_gap
        for j in range(len(centroids)):
            members = x[assignments == j]
            assert len(members) > 0, "an empty cluster: pick other test data (the re-seeding rules differ)"
            centroids[j] = members.mean(dim=0)


def _initial_rows(x, k, seed):
    """The rows ClusterFit's k-means starts from: clusterfit.kmeans with 0 iterations returns them."""
    init, _ = clusterfit.kmeans(x, k, 0, "l2norm-euclidean", seed)
    normalised = _vissl_normalise(x.double())
    first = torch.cdist(init.double(), normalised).argmin(dim=1)
    torch.testing.assert_close(init.double(), normalised[first], rtol=1e-6, atol=1e-7)  # k rows of the data
    assert len(set(first.tolist())) == k  # distinct
    return first


@pytest.mark.parametrize("n,d,k,n_iters,blobs,data_seed", [(203, 11, 7, 6, 7, 3), (157, 5, 3, 9, 4, 7)])
def test_clusterfit_kmeans_is_l2_normalise_then_euclidean_lloyd(n, d, k, n_iters, blobs, data_seed):
    x = _clusterfit_features(n, d, blobs, data_seed).float()  # features.pth holds float32
    first = _initial_rows(x, k, seed=4)
    ref_c, ref_a, gap = _euclidean_lloyd(_vissl_normalise(x.double()), first, n_iters)
    # no near-ties at any iteration (float32 squared distances of unit-norm rows are off by < 1e-6), so the
    # float32 kernels and the float64 reference must make every assignment alike
    assert gap > 1e-5

    centroids, assignments = clusterfit.kmeans(x, k, n_iters, "l2norm-euclidean", seed=4)  # the default mode
    assert clusterfit.Args().kmeans == "l2norm-euclidean"
    assert torch.equal(assignments, ref_a)
    torch.testing.assert_close(centroids.double(), ref_c, rtol=1e-5, atol=1e-6)  # float32 kernels
    c64, a64 = clusterfit.kmeans(x.double(), k, n_iters, "l2norm-euclidean", seed=4)  # the float64 path
    assert torch.equal(a64, ref_a)
    torch.testing.assert_close(c64, ref_c, rtol=1e-12, atol=1e-14)

    # what makes it VISSL's and not the other modes: centroids are means of unit rows (inside the sphere) ...
    assert (ref_c.norm(dim=1) < 1 - 1e-3).any()
    spherical_c, _ = clusterfit.kmeans(x, k, n_iters, "spherical", seed=4)
    torch.testing.assert_close(spherical_c.norm(dim=1), torch.ones(k), rtol=0, atol=1e-5)
    # ... and the rows are normalised first: on the raw rows the same Lloyd groups them otherwise
    _, raw_a, _ = _euclidean_lloyd(x.double(), first, n_iters)
    assert not torch.equal(raw_a, ref_a)


def test_clusterfit_normalisation_is_vissls_norm_plus_1e5():
    x = _clusterfit_features(31, 9).double()
    x[4] = 0.0  # a zero row stays zero
    x[7] *= 1e-4  # a tiny row: |row| + 1e-5 is far from |row|
    torch.testing.assert_close(clusterfit.l2_normalise(x), _vissl_normalise(x), rtol=1e-14, atol=0)
    assert torch.equal(clusterfit.l2_normalise(x)[4], torch.zeros(9))
    assert float(clusterfit.l2_normalise(x)[7].norm()) < 0.99


def test_clusterfit_kmeans_equals_faiss_from_the_same_start():
    """The original pipeline's own k-means: faiss.Kmeans (Euclidean, VISSL's settings) on the normalised rows,
    started from the same rows, then index.search(x, 1) as VISSL labels the images."""
    faiss = pytest.importorskip("faiss")
    n, d, k, n_iters = 203, 11, 7, 6
    x = _clusterfit_features(n, d, 7, 3).float()
    first = _initial_rows(x, k, seed=4)
    normalised = _vissl_normalise(x.double()).float().numpy()
    km = faiss.Kmeans(d, k, niter=n_iters, verbose=False, gpu=False)
    km.train(normalised, init_centroids=normalised[first.numpy()])
    _, labels = km.index.search(normalised, 1)
    centroids, assignments = clusterfit.kmeans(x, k, n_iters, "l2norm-euclidean", seed=4)
    assert torch.equal(assignments, torch.from_numpy(labels[:, 0]).long())
    torch.testing.assert_close(centroids, torch.from_numpy(km.centroids), rtol=1e-5, atol=1e-6)
