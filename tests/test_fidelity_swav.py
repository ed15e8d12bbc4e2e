"""SwAV and DeepCluster-v2 against independent float64 re-derivations of the original formulas.

The references below are written in NumPy from the paper (Caron et al. 2020, Eq. 1-3 and Appendix A.2)
and the swav repository's main_swav.py (distributed_sinkhorn, the swapped-prediction loss) and
main_deepclusterv2.py (cluster_memory: spherical k-means started from bank rows, the bank of head h
being h mod the number of banks; the cross-entropy over every crop). Sizes are odd on purpose; the
gradients are the analytic ones (codes and pseudo-labels are constants, as the original computes them
without gradient), so they do not share autograd with the code under test.
"""
import numpy as np
import torch

import deepcluster_v2 as dc
import swav
from common import cli, ops


# ----------------------------------------------------------------------------- float64 references

def ref_swav_sinkhorn(scores, epsilon, n_iters):
    """main_swav.py's distributed_sinkhorn on one process: Q = exp(S / eps)^T (K x B), scaled to sum 1, then
    n_iters rounds of "each prototype's row sums to 1/K" and "each sample's column sums to 1/B"; times B."""
    q = np.exp(np.asarray(scores, dtype=np.float64) / epsilon).T
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(axis=1, keepdims=True) / n_prototypes
        q = q / q.sum(axis=0, keepdims=True) / n_samples
    return (q * n_samples).T


def ref_log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def ref_swav_loss_and_grad(scores, n_crops, crops_for_assign, temperature, epsilon, n_iters, queue_scores=None):
    """The swapped-prediction loss of main_swav.py and its gradient with respect to the scores.

    For each assigned crop c: codes q = Sinkhorn([queue scores; scores of crop c])[last n rows]; every other
    crop v predicts them, -mean_i sum_k q_ik log softmax(s_v / T)_ik, averaged over the n_crops - 1 crops v,
    then over the assigned crops. With q constant, d/ds_v = (softmax(s_v / T) - q) / (T n (n_crops - 1) A).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores) // n_crops
    a = len(crops_for_assign)
    loss, grad = 0.0, np.zeros_like(scores)
    for j, c in enumerate(crops_for_assign):
        block = scores[c * n:(c + 1) * n]
        if queue_scores is not None:
            block = np.concatenate([np.asarray(queue_scores[j], dtype=np.float64), block])
        q = ref_swav_sinkhorn(block, epsilon, n_iters)[-n:]
        for v in range(n_crops):
            if v == c:
                continue
            log_p = ref_log_softmax(scores[v * n:(v + 1) * n] / temperature)
            loss += -(q * log_p).sum(axis=1).mean() / (n_crops - 1) / a
            grad[v * n:(v + 1) * n] += (np.exp(log_p) - q) / (temperature * n * (n_crops - 1) * a)
    return loss, grad


def ref_spherical_kmeans(points, start_rows, n_iters):
    """main_deepclusterv2.py's cluster_memory for one head on one process: centroids start at the bank rows
    `start_rows`; n_iters rounds of (assign each row to its largest dot product; each centroid with members
    becomes their mean, an empty one keeps its value; every centroid is L2-normalised), then a last
    assignment. Returns the centroids, the assignments and whether a cluster ever emptied."""
    points = np.asarray(points, dtype=np.float64)
    centroids = points[start_rows].copy()
    emptied = False
    for it in range(n_iters + 1):
        assignments = (points @ centroids.T).argmax(axis=1)
        if it == n_iters:
            break
        for k in range(len(centroids)):
            members = points[assignments == k]
            if len(members):
                centroids[k] = members.mean(axis=0)
            else:
                emptied = True
        centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return centroids, assignments, emptied


def ref_deepcluster_loss_and_grad(scores, targets, n_crops, temperature, ignore):
    """main_deepclusterv2.py's loss: per head, the cross-entropy of scores / T of every crop (crop-major rows)
    against its image's cluster id, averaged over the rows whose id is not `ignore`; then averaged over the
    heads. Returns the loss and d/d scores (softmax - one-hot) / (T count H) per head."""
    loss, grads = 0.0, []
    n_heads = len(scores)
    for s, t in zip(scores, targets):
        s = np.asarray(s, dtype=np.float64)
        t = np.tile(np.asarray(t), n_crops)
        keep = t != ignore
        log_p = ref_log_softmax(s / temperature)
        loss += -log_p[keep, t[keep]].sum() / keep.sum() / n_heads
        g = np.exp(log_p)
        g[keep, t[keep]] -= 1.0
        g[~keep] = 0.0
        grads.append(g / (temperature * keep.sum() * n_heads))
    return loss, grads


def unit_rows(*shape, generator, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- SwAV

def test_swav_fidelity_recipe_defaults_are_the_swav_repository_scripts():
    """scripts/swav_100ep_pretrain.sh at 64 x 64 GPUs, and swav_200ep_bs256_pretrain.sh for the small-batch
    preset (learning rates are quoted per 256 images and scaled linearly)."""
    args = cli.parse_args(swav.Args, swav.PRESETS, [])
    per_4096 = 4096 / 256
    assert (args.start_lr * per_4096, args.lr * per_4096, args.final_lr * per_4096) == (0.3, 4.8, 0.0048)
    assert (args.warmup_epochs, args.epochs, args.weight_decay, args.momentum) == (10, 100, 1e-6, 0.9)
    assert (args.temperature, args.epsilon, args.sinkhorn_iters, args.n_prototypes) == (0.1, 0.05, 3, 3000)
    assert args.crops_for_assign == (0, 1) and (args.hidden_dim, args.embedding_dim) == (2048, 128)
    assert args.crops == "2x224,6x96" and args.crop_scale == (0.14, 1.0) and args.small_crop_scale == (0.05, 0.14)
    assert args.freeze_prototypes_epochs == 1.0 and args.queue_length == 0 and not args.exclude_bias_and_norm
    small = cli.parse_args(swav.Args, swav.PRESETS, ["--preset", "small-batch"])
    assert (small.lr, small.final_lr, small.warmup_epochs, small.epochs) == (0.6, 0.0006, 0.0, 200)
    assert (small.queue_length, small.epoch_queue_starts) == (3840, 15)


def test_swav_fidelity_sinkhorn_is_the_original_iteration():
    g = torch.Generator().manual_seed(11)
    z, prototypes = unit_rows(13 + 9, 5, generator=g), unit_rows(7, 5, generator=g)
    scores = z @ prototypes.t()  # cosines, as in training: 13 batch rows after 9 queue rows, 7 prototypes
    for epsilon, n_iters in ((0.05, 3), (0.05, 1), (0.1, 4), (0.03, 3)):
        expected = torch.from_numpy(ref_swav_sinkhorn(scores.numpy(), epsilon, n_iters))
        torch.testing.assert_close(ops.sinkhorn(scores, epsilon, n_iters), expected, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(ops.sinkhorn(scores.float(), epsilon, n_iters).double(), expected,
                                   rtol=2e-5, atol=1e-7)  # the compiled float32 kernel when built
        torch.testing.assert_close(ops.sinkhorn_reference(scores.float(), epsilon, n_iters).double(), expected,
                                   rtol=2e-5, atol=1e-7)
    # the reference itself: each sample's codes sum to 1; iterated long, each prototype gets B / K of the mass
    long = ref_swav_sinkhorn(scores.numpy(), 0.05, 500)
    np.testing.assert_allclose(long.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(long.sum(axis=0), 22 / 7, rtol=1e-6)


def test_swav_fidelity_loss_value_and_gradient_with_multicrop_and_queue():
    """2 large + 3 small crops of 7 images, 9 prototypes, an 11-row queue per assigned crop."""
    g = torch.Generator().manual_seed(3)
    n, n_crops, k, d = 7, 5, 9, 6
    z0, c0, queue = unit_rows(n_crops * n, d, generator=g), unit_rows(k, d, generator=g), unit_rows(2, 11, d, generator=g)
    for crops_for_assign in ((0, 1), (1,), (0, 3)):
        for with_queue in (False, True):
            for dtype, rtol, atol in ((torch.float64, 1e-9, 1e-12), (torch.float32, 2e-5, 1e-6)):
                z = z0.to(dtype).requires_grad_()
                prototypes = c0.to(dtype).requires_grad_()
                scores = z @ prototypes.t()
                queue_scores = None
                if with_queue:
                    queue_scores = [queue[j].to(dtype) @ prototypes.detach().t() for j in range(len(crops_for_assign))]
                loss = swav.swav_loss(scores, n_crops, crops_for_assign, 0.1, 0.05, 3, queue_scores)
                grad_z, grad_c = torch.autograd.grad(loss, (z, prototypes))
                ref_loss, ref_grad = ref_swav_loss_and_grad(
                    scores.detach().double().numpy(), n_crops, crops_for_assign, 0.1, 0.05, 3,
                    None if queue_scores is None else [s.double().numpy() for s in queue_scores])
                ref_grad_z = ref_grad @ prototypes.detach().double().numpy()
                ref_grad_c = ref_grad.T @ z.detach().double().numpy()
                case = f"crops_for_assign {crops_for_assign}, queue {with_queue}, {dtype}"
                torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64),
                                           rtol=rtol, atol=atol, msg=case)
                torch.testing.assert_close(grad_z.double(), torch.from_numpy(ref_grad_z), rtol=rtol, atol=atol,
                                           msg=case)
                torch.testing.assert_close(grad_c.double(), torch.from_numpy(ref_grad_c), rtol=rtol, atol=atol,
                                           msg=case)
    # the queue changes the codes (so the comparison above exercises it)
    scores = z0 @ c0.t()
    with_queue = swav.swav_loss(scores, n_crops, (0, 1), 0.1, 0.05, 3, [queue[j] @ c0.t() for j in range(2)])
    assert abs(with_queue.item() - swav.swav_loss(scores, n_crops, (0, 1), 0.1, 0.05, 3).item()) > 1e-4


# ----------------------------------------------------------------------------- DeepCluster-v2

def dc_args(*extra):
    return cli.parse_args(dc.Args, dc.PRESETS, ["--arch", "resnet18", "--hidden-dim", "16", *extra])


def test_deepcluster_v2_fidelity_recipe_defaults_are_the_swav_repository_scripts():
    """scripts/deepclusterv2_800ep_pretrain.sh at 64 x 64 GPUs (and VISSL's crops_for_mb [0, 1]); the 400ep preset
    is deepclusterv2_400ep_pretrain.sh."""
    args = cli.parse_args(dc.Args, dc.PRESETS, [])
    per_4096 = 4096 / 256
    assert (args.start_lr * per_4096, args.lr * per_4096, args.final_lr * per_4096) == (0.3, 4.8, 0.0048)
    assert (args.warmup_epochs, args.epochs, args.weight_decay, args.momentum) == (10, 800, 1e-6, 0.9)
    assert (args.temperature, args.num_clusters, args.kmeans_iters) == (0.1, (3000, 3000, 3000), 10)
    assert args.crops_for_mb == (0, 1) and (args.hidden_dim, args.embedding_dim) == (2048, 128)
    assert args.crops == "2x224,6x96" and args.crop_scale == (0.14, 1.0) and args.small_crop_scale == (0.05, 0.14)
    short = cli.parse_args(dc.Args, dc.PRESETS, ["--preset", "400ep"])
    assert (short.crops, short.crop_scale, short.small_crop_scale, short.epochs) == (
        "2x160,4x96", (0.08, 1.0), (0.05, 0.14), 400)
    assert cli.parse_args(dc.Args, dc.PRESETS, ["--preset", "cifar"]).crops_for_mb == (0, 1)


def test_deepcluster_v2_fidelity_head_h_clusters_bank_h_mod_the_number_of_banks():
    """Each bank lives near its own axis, so a head's centroids show which bank it clustered, whatever the
    k-means start: with crops_for_mb (0, 1) and 3 heads, banks 0, 1, 0; with 3 banks and 5 heads, 0, 1, 2, 0, 1."""
    g = torch.Generator().manual_seed(5)
    d, rows = 6, 37
    axes = torch.eye(d, dtype=torch.float64)
    for crops_for_mb, heads in (((0, 1), (3, 4, 5)), ((0, 1, 2), (3, 4, 5, 2, 3))):
        n_banks = len(crops_for_mb)
        bank = torch.stack([torch.nn.functional.normalize(axes[b] + 0.15 * torch.randn(rows, d, generator=g, dtype=
                                                          torch.float64), dim=1) for b in range(n_banks)])
        model = dc.DeepClusterV2(dc_args("--embedding-dim", str(d), "--num-clusters", *map(str, heads),
                                         "--crops-for-mb", *map(str, crops_for_mb))).double()
        indices = torch.randperm(rows + 4, generator=g)[:rows]
        labels = dc.cluster_memory(model, bank, indices, rows + 4, 10, seed=2)
        for h, head in enumerate(model.prototypes):
            nearest_axis = (head.weight @ axes.t()).argmax(dim=1)
            assert (nearest_axis == h % n_banks).all(), (crops_for_mb, h, nearest_axis)
            # the labels are those centroids' assignments of that bank's rows
            assert torch.equal(labels[h, indices], (bank[h % n_banks] @ head.weight.t()).argmax(dim=1))


def test_deepcluster_v2_fidelity_assignment_step_is_the_original_spherical_kmeans():
    """cluster_memory = main_deepclusterv2.py's cluster_memory from the same starting rows: centroids and every
    banked image's label, for 3 heads over banks 0, 1, 0 of 53 rows (71 images, 18 of them not banked)."""
    g = torch.Generator().manual_seed(17)
    d, rows, n_images, heads, seed = 5, 53, 71, (5, 7, 6), 4
    bank = unit_rows(2, rows, d, generator=g)
    indices = torch.randperm(n_images, generator=g)[:rows]
    unbanked = torch.ones(n_images, dtype=torch.bool)
    unbanked[indices] = False
    model = dc.DeepClusterV2(dc_args("--embedding-dim", str(d), "--num-clusters", *map(str, heads))).double()
    # the starting rows that `seed` picks: with 0 iterations the centroids are those (unit) bank rows
    dc.cluster_memory(model, bank, indices, n_images, 0, seed=seed)
    starts = []
    for h, head in enumerate(model.prototypes):
        similarity, rows_found = (head.weight @ bank[h % 2].t()).max(dim=1)
        torch.testing.assert_close(similarity, torch.ones_like(similarity), rtol=0, atol=1e-12)
        assert len(set(rows_found.tolist())) == heads[h]  # distinct rows
        starts.append(rows_found.numpy())
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 1e-6)):
        model = model.to(dtype)
        labels = dc.cluster_memory(model, bank.to(dtype), indices, n_images, 10, seed=seed)
        assert (labels[:, unbanked] == dc.IGNORE).all()
        for h, head in enumerate(model.prototypes):
            centroids, assignments, emptied = ref_spherical_kmeans(bank[h % 2].numpy(), starts[h], 10)
            assert not emptied  # (ops.kmeans re-seeds an emptied cluster; the original keeps it)
            torch.testing.assert_close(head.weight.double(), torch.from_numpy(centroids), rtol=rtol, atol=atol,
                                       msg=f"head {h}, {dtype}")
            assert labels[h, indices].tolist() == assignments.tolist(), (h, dtype)
            # k-means moved the centroids away from the starting rows (the iterations are exercised)
            assert not np.allclose(centroids, bank[h % 2].numpy()[starts[h]], atol=1e-3)


def test_deepcluster_v2_fidelity_loss_value_and_gradient():
    """3 heads of 5, 8 and 6 centroids, 7 images x 3 crops, two images without a pseudo-label in some heads."""
    g = torch.Generator().manual_seed(23)
    n, n_crops, d, heads = 7, 3, 4, (5, 8, 6)
    z0 = unit_rows(n_crops * n, d, generator=g)
    centroids = [unit_rows(k, d, generator=g) for k in heads]
    targets = torch.stack([torch.randint(0, k, (n,), generator=g) for k in (5, 5, 5)])
    targets[1] = targets[1] + 3  # ids up to 7 for the 8-centroid head
    targets[0, 2] = targets[2, 2] = targets[2, 5] = dc.IGNORE
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 2e-5, 1e-6)):
        z = z0.to(dtype).requires_grad_()
        scores = [z @ c.to(dtype).t() for c in centroids]
        loss = dc.deepcluster_loss(scores, targets, n_crops, 0.1)
        (grad_z,) = torch.autograd.grad(loss, z)
        ref_loss, ref_grads = ref_deepcluster_loss_and_grad([s.detach().double().numpy() for s in scores],
                                                            targets.numpy(), n_crops, 0.1, dc.IGNORE)
        ref_grad_z = sum(gr @ c.numpy() for gr, c in zip(ref_grads, centroids))
        torch.testing.assert_close(loss.double(), torch.tensor(ref_loss, dtype=torch.float64), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad_z.double(), torch.from_numpy(ref_grad_z), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- multi-crop forward

def test_the_head_normalises_every_crop_at_once():
    """The trunk runs once per crop size, the head once on every crop (swav's resnet50.py: forward_head on the
    concatenated trunk outputs), so the head's BatchNorm statistics cover the large and the small crops."""
    import simclr
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(3, 3, size, size, generator=gen, dtype=torch.float64) for size in (32, 32, 16, 16)]
    small = ["--arch", "resnet18", "--hidden-dim", "16"]
    models_ = [swav.SwAV(cli.parse_args(swav.Args, swav.PRESETS, [*small, "--n-prototypes", "7"])),
               dc.DeepClusterV2(dc_args("--num-clusters", "7", "5")),
               simclr.SimCLR(cli.parse_args(simclr.Args, None, [*small, "--head-bn"]))]
    for model in models_:
        model = model.double().train()
        out = model(crops)
        z = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            features = torch.cat([model.trunk(torch.cat(crops[:2])), model.trunk(torch.cat(crops[2:]))])
            expected = torch.nn.functional.normalize(model.head(features), dim=1)
            by_size = torch.nn.functional.normalize(torch.cat([model.head(features[:6]), model.head(features[6:])]),
                                                    dim=1)
        torch.testing.assert_close(z.detach(), expected, rtol=1e-10, atol=1e-12)
        assert (z.detach() - by_size).abs().max() > 1e-3  # statistics per crop size would differ


def test_learning_rate_schedule_is_main_swavs():
    """main_swav.py / main_deepclusterv2.py: np.linspace(start_warmup, base_lr, warmup iterations) (its last value is
    the peak), then final + (base - final)(1 + cos(pi t / T)) / 2 over the remaining T iterations."""
    from common import optim
    for warmup, total in ((7, 30), (1, 5), (0, 9)):
        start, base, final = 0.3, 4.8, 0.0048
        iters = np.arange(total - warmup)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / (total - warmup)))
        reference = np.concatenate([np.linspace(start, base, warmup), cosine])
        ours = [optim.warmup_cosine(step, total, warmup, base, final, start, endpoint=True) for step in range(total)]
        np.testing.assert_allclose(ours, reference, rtol=1e-14, atol=0)
    assert optim.warmup_cosine(6, 30, 7, 4.8, 0.0048, 0.3, endpoint=True) == 4.8
