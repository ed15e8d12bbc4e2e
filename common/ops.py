"""The three hot spots of SSL training: Sinkhorn-Knopp, the contrastive loss, k-means.

Each public function validates its inputs, then runs the compiled extension
(`common._C`, built by setup.py from csrc/) when it is available for the tensor's
device, else the pure-PyTorch reference implementation below. The references are
written for clarity and exactness; they are what the tests compare against.
`backend()` says which implementation runs.
"""
import math
import os

import torch
import torch.distributed as dist

try:  # the compiled extension is optional: everything works without it
    from common import _C
except ImportError:  # not built
    _C = None
if os.environ.get("SSL_OPS_FORCE_REFERENCE", "0") == "1":  # e.g. to compare against the references end to end
    _C = None


def backend(device="cpu"):
    """'compiled-cuda', 'compiled-cpu' or 'reference': what runs for tensors on `device`."""
    device = torch.device(device)
    if _C is not None:
        if device.type == "cuda" and getattr(_C, "has_cuda", lambda: False)():
            return "compiled-cuda"
        if device.type == "cpu":
            return "compiled-cpu"
    return "reference"


def _use_compiled(t):
    """Whether the compiled kernels run for tensor t (float64 always goes to the reference)."""
    return _C is not None and t.dtype != torch.float64 and backend(t.device) != "reference"


def _kernel_dtype(t):
    """What the kernels read: float32 on CPU; float32/bf16/fp16 on CUDA (fp32 accumulation)."""
    return t if t.is_cuda else t.float()


# ----------------------------------------------------------------------------- checks

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_matrix(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor, got shape {tuple(t.shape)}.")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}.")
    if t.layout != torch.strided or t.device.type == "meta":
        raise ValueError(f"{name} must be a dense tensor with data, got a {t.layout} tensor on {t.device}.")


def _integer(name, value, minimum, maximum=None):
    """value as an int, or one sentence: it must be an integral number in [minimum, maximum)."""
    try:
        ok = not isinstance(value, (bool, str, bytes)) and math.isfinite(float(value)) and int(value) == value \
            and value >= minimum and (maximum is None or value < maximum)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        what = "a non-negative" if minimum == 0 else ("a positive" if minimum == 1 else "an")
        raise ValueError(f"{name} must be {what} integer{'' if maximum is None else ' below ' + str(maximum)}, "
                         f"got {value!r}.")
    return int(value)


def _positive(name, value):
    """value as a float, or one sentence: it must be a finite positive number."""
    try:
        number = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number) or not number > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return number


def _check_index(name, idx, n, m, device):
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer (int64 or int32) tensor.")
    if idx.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(idx.shape)}.")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the features are on {device}.")
    if n and (int(idx.min()) < 0 or int(idx.max()) >= m):
        raise ValueError(f"{name} has values outside [0, {m}).")


def _world(group):
    """The process group to reduce over, or None when running alone."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- sinkhorn

def sinkhorn(scores, epsilon=0.05, n_iters=3, group=None):
    """SwAV's Sinkhorn-Knopp (Caron et al. 2020, Alg. 1 / Eq. 3) on Q = exp(scores / epsilon).

    scores: [B, K] similarities of B samples to K prototypes (this rank's rows).
    Returns [B, K] soft assignments: the prototypes share the (global) batch equally
    and each row sums to 1. Distributed: column sums are all-reduced, so the result
    equals running it on the concatenation of all ranks' rows.
    """
    _check_matrix("scores", scores)
    epsilon = _positive("epsilon", epsilon)
    n_iters = _integer("n_iters", n_iters, 1)
    if scores.shape[1] == 0:
        raise ValueError("scores must have at least one column (prototype).")
    group = _world(group)
    if _use_compiled(scores):
        return _sinkhorn_compiled(scores, epsilon, n_iters, group)
    return sinkhorn_reference(scores, epsilon, n_iters, group)


def _sinkhorn_compiled(scores, epsilon, n_iters, group):
    """The kernels keep Q = exp((scores - colmax)/eps - rowmax) once and update scaling vectors.

    u (one per prototype) = 1 / column sums, all-reduced; v (one per sample) is local.
    The constants 1/K and 1/B of SwAV's formula cancel in the final row normalisation.
    """
    with torch.no_grad():
        s = _kernel_dtype(scores.detach()).contiguous()
        n_prototypes = s.shape[1]
        if s.shape[0]:
            colmax = _C.column_max(s) if s.device.type == "cpu" else s.amax(dim=0).float()
        else:
            colmax = torch.full((n_prototypes,), -math.inf, device=s.device)
        colmax = _all_reduce(colmax, dist.ReduceOp.MAX, group)
        q, colsum = _C.sinkhorn_init(s, float(epsilon), colmax)
        for _ in range(int(n_iters) - 1):
            colsum = _C.sinkhorn_step(q, 1.0 / _all_reduce(colsum, dist.ReduceOp.SUM, group))
        q = _C.sinkhorn_finish(q, 1.0 / _all_reduce(colsum, dist.ReduceOp.SUM, group))
    return q.to(scores.dtype)


def _all_reduce(t, op, group):
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _global_rows(n_local, group, device):
    n = torch.tensor([float(n_local)], device=device, dtype=torch.float64)
    return int(_all_reduce(n, dist.ReduceOp.SUM, group).item())


def sinkhorn_reference(scores, epsilon=0.05, n_iters=3, group=None):
    """Sinkhorn-Knopp in the log domain: mathematically SwAV's iteration, never overflows.

    With log Q = scores/eps - u[k] - v[b], SwAV's "divide each prototype's row by its
    sum, then by K" is u += logsumexp_b(log Q) + log K, and "divide each sample's
    column by its sum, then by B" is v += logsumexp_k(log Q) + log B. The final
    multiplication by B makes each sample's assignment sum to one.
    """
    group = _world(group)
    with torch.no_grad():
        log_q = scores.detach().to(_compute_dtype(scores)) / epsilon
        n_samples, n_prototypes = log_q.shape
        total_samples = _global_rows(n_samples, group, log_q.device)
        if total_samples == 0:
            return torch.zeros_like(scores)
        for _ in range(int(n_iters)):
            # prototypes: logsumexp over all ranks' samples, computed stably
            col_max = log_q.max(dim=0).values if n_samples else torch.full(
                (n_prototypes,), -math.inf, device=log_q.device, dtype=log_q.dtype)
            col_max = _all_reduce(col_max.clone(), dist.ReduceOp.MAX, group)
            col_sum = (log_q - col_max).exp().sum(dim=0)
            col_sum = _all_reduce(col_sum, dist.ReduceOp.SUM, group)
            log_q = log_q - (col_max + col_sum.log() + math.log(n_prototypes))
            # samples: each row normalised to 1/B
            log_q = log_q - (torch.logsumexp(log_q, dim=1, keepdim=True) + math.log(total_samples))
        q = (log_q + math.log(total_samples)).exp()
    return q.to(scores.dtype)


# ----------------------------------------------------------------------------- contrastive

_REDUCTIONS = ("mean", "sum", "none")


def contrastive_loss(queries, keys, pos_index, temperature, self_index=None, reduction="mean"):
    """InfoNCE / NT-Xent (Oord et al. 2018; Chen et al. 2020, Eq. 1) over `queries @ keys.T / T`.

    queries [N, D], keys [M, D] (used as given: L2-normalise them first). Row i's
    target is column pos_index[i]; column self_index[i] (SimCLR's own view) is left
    out of the softmax. Returns the mean (or sum, or per-row) cross-entropy.
    The compiled version never materialises the N x M logits.
    """
    _check_matrix("queries", queries)
    _check_matrix("keys", keys)
    n, d = queries.shape
    m, dk = keys.shape
    if dk != d:
        raise ValueError(f"queries and keys must have the same feature size, got {d} and {dk}.")
    if keys.dtype != queries.dtype:
        raise ValueError(f"queries ({queries.dtype}) and keys ({keys.dtype}) must have the same dtype.")
    if keys.device != queries.device:
        raise ValueError(f"queries ({queries.device}) and keys ({keys.device}) must be on the same device.")
    if m == 0:
        raise ValueError("keys must have at least one row.")
    _check_index("pos_index", pos_index, n, m, queries.device)
    if self_index is not None:
        _check_index("self_index", self_index, n, m, queries.device)
        if bool((self_index == pos_index).any()):
            raise ValueError("pos_index and self_index must differ for every row.")
    temperature = _positive("temperature", temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if _use_compiled(queries) and keys is queries:
        # SimCLR on one process: the logits are symmetric; the CPU kernel computes half the tiles, the CUDA
        # kernels half the backward's (csrc/contrastive.cpp, csrc/kernels/contrastive.cuh)
        per_row = _SymmetricContrastiveLoss.apply(_kernel_dtype(queries), pos_index.long().contiguous(),
                                                  None if self_index is None else self_index.long().contiguous(),
                                                  temperature, _TILES[0])
        return _reduce(per_row, reduction)
    if _use_compiled(queries):
        per_row = _ContrastiveLoss.apply(_kernel_dtype(queries), _kernel_dtype(keys), pos_index.long().contiguous(),
                                         None if self_index is None else self_index.long().contiguous(),
                                         temperature, _TILES)
        return _reduce(per_row, reduction)
    return contrastive_loss_reference(queries, keys, pos_index, temperature, self_index, reduction)


_TILES = (0, 0)  # (query rows, keys) per tile; 0 = the kernel's default. Tests vary it.


class _ContrastiveLoss(torch.autograd.Function):
    """Per-row loss by the fused kernel; backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, queries, keys, pos_index, self_index, temperature, tiles):
        q, k = queries.detach().contiguous(), keys.detach().contiguous()
        loss, lse = _C.contrastive_forward(q, k, pos_index, self_index, temperature, *tiles)
        ctx.save_for_backward(q, k, pos_index, lse)
        ctx.self_index, ctx.temperature, ctx.tiles = self_index, temperature, tiles
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        q, k, pos_index, lse = ctx.saved_tensors
        need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dq or need_dk):
            return None, None, None, None, None, None
        dq, dk = _C.contrastive_backward(q, k, pos_index, ctx.self_index, ctx.temperature, lse,
                                         grad_rows.contiguous(), bool(need_dk), *ctx.tiles, need_dq=bool(need_dq))
        dq = dq.to(q.dtype) if need_dq else None
        dk = dk.to(k.dtype) if need_dk else None
        return dq, dk, None, None, None, None


class _SymmetricContrastiveLoss(torch.autograd.Function):
    """contrastive_loss(z, z, ...): on CPU each pair of tiles of Z Z^T is computed once; on CUDA the
    backward is one kernel for dz = dq + dk."""

    @staticmethod
    def forward(ctx, z, pos_index, self_index, temperature, tile):
        z = z.detach().contiguous()
        loss, lse = _C.contrastive_forward_sym(z, pos_index, self_index, temperature, tile)
        ctx.save_for_backward(z, pos_index, lse)
        ctx.self_index, ctx.temperature, ctx.tile = self_index, temperature, tile
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        z, pos_index, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dz = _C.contrastive_backward_sym(z, pos_index, ctx.self_index, ctx.temperature, lse,
                                         grad_rows.contiguous(), ctx.tile)
        return dz.to(z.dtype), None, None, None, None


def _reduce(per_row, reduction):
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


def contrastive_loss_reference(queries, keys, pos_index, temperature, self_index=None, reduction="mean"):
    """The plain formula: materialises the N x M logits (fp32 for half inputs)."""
    compute = _compute_dtype(queries)
    logits = queries.to(compute) @ keys.to(compute).t() / temperature
    if self_index is not None:
        excluded = torch.zeros_like(logits, dtype=torch.bool)
        excluded[torch.arange(len(logits), device=logits.device), self_index.long()] = True
        logits = logits.masked_fill(excluded, -math.inf)
    per_row = torch.logsumexp(logits, dim=1) - logits.gather(1, pos_index.long()[:, None])[:, 0]
    return _reduce(per_row, reduction)


# ----------------------------------------------------------------------------- k-means

def kmeans(x, k, n_iters=10, spherical=True, init="random", seed=0, group=None, tf32=False):
    """Lloyd's k-means (DeepCluster-v2's spherical variant when spherical=True).

    x: [N, D] this rank's rows. init: "random" (k distinct rows of the global data,
    chosen by `seed`) or a [k, D] tensor of starting centroids. Runs n_iters
    assign/update rounds, then a final assignment, so assignments[i] is the best
    returned centroid for row i. Empty clusters are re-seeded with the points
    farthest from their centroids. Distributed: sums and counts are all-reduced and
    every rank returns the same centroids (and the assignments of its own rows).
    tf32: on CUDA, the compiled kernel scores with TF32 tensor cores and rescores each
    row's winner in fp32, so the choice can differ from fp32's only between centroids
    whose scores agree to TF32's rounding (inputs rounded to 11 significant bits). Off
    by default; the CPU kernels and the PyTorch reference are exact whatever it says.
    Returns (centroids [k, D], assignments [N] int64).
    """
    _check_matrix("x", x)
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be True or False, got {tf32!r}.")
    k = _integer("k", k, 1)
    n_iters = _integer("n_iters", n_iters, 0)
    seed = _integer("seed", seed, -2 ** 63, 2 ** 63)
    group = _world(group)
    total = _global_rows(x.shape[0], group, x.device)
    if total < k:
        raise ValueError(f"k-means needs at least k={k} points, got {total}.")
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init centroids must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}.")
        if init.device != x.device:
            raise ValueError(f"init centroids are on {init.device} but x is on {x.device}.")
        if init.dtype not in _FLOATS:
            raise ValueError(f"init centroids must be a floating-point tensor, got {init.dtype}.")
    elif init != "random":
        raise ValueError(f"init must be 'random' or a [k, D] tensor, got {init!r}.")
    if _use_compiled(x):
        with torch.no_grad():
            points = x.detach().float().contiguous()
            centroids, assignments = _lloyd(points, k, n_iters, spherical, init, seed, group,
                                            _CompiledAssign(tf32), _compiled_update)
        return centroids.to(x.dtype), assignments
    return kmeans_reference(x, k, n_iters, spherical, init, seed, group)


class _CompiledAssign:
    """_C.kmeans_assign; on CPUs with native bf16 dot products its screened twin (bf16 GEMM
    shortlist, exact fp32 rescoring: the same assignments, csrc/kmeans.cpp), for which the
    bf16 copy and the row norms of the points, fixed during a run, are made once."""

    def __init__(self, tf32=False):
        self.points, self.tf32 = None, tf32

    def __call__(self, points, centroids, spherical):
        if points.is_cuda:
            return _C.kmeans_assign(points, centroids.contiguous(), bool(spherical), 0, self.tf32)
        if not _C.cpu_has_bf16_dot():
            return _C.kmeans_assign(points, centroids.contiguous(), bool(spherical), 0)
        if self.points is not points:
            self.points, self.low, self.norms = points, points.bfloat16(), points.norm(dim=1)
        return _C.kmeans_assign_screened(points, self.low, self.norms, centroids.contiguous(), bool(spherical), 0)


def _compiled_update(points, assignments, k):
    return _C.kmeans_update(points, assignments, k)


def _random_init(x, k, seed, group):
    """k distinct rows of the concatenation of every rank's x, chosen by `seed`."""
    counts = torch.zeros(dist.get_world_size(group) if group is not None else 1, dtype=torch.float64,
                         device=x.device)
    rank = dist.get_rank(group) if group is not None else 0
    counts[rank] = x.shape[0]
    counts = _all_reduce(counts, dist.ReduceOp.SUM, group).long().cpu()
    offset = int(counts[:rank].sum())
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(int(counts.sum()), generator=generator)[:k].to(x.device)
    mine = (chosen >= offset) & (chosen < offset + x.shape[0])
    centroids = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[mine] = x[chosen[mine] - offset]
    return _all_reduce(centroids, dist.ReduceOp.SUM, group)


def _assign(x, centroids, spherical, chunk=16384):
    """Best centroid and its score for each row, chunked over rows (score: higher is closer)."""
    best_score = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    best = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    half_sq_norms = 0.5 * (centroids * centroids).sum(dim=1)
    for start in range(0, x.shape[0], chunk):
        scores = x[start:start + chunk] @ centroids.t()
        if not spherical:  # argmin |x - c|^2 = argmax x.c - |c|^2 / 2
            scores = scores - half_sq_norms
        best_score[start:start + chunk], best[start:start + chunk] = scores.max(dim=1)
    return best_score, best


def _farthest_points(x, best_score, n, group):
    """The n rows of the global data whose best score is lowest (farthest from their centroid).

    best_score must compare across rows: the cosine (spherical), x.c - |x|^2 / 2 = -|x - c|^2 / 2
    (Euclidean)."""
    local_n = min(n, x.shape[0])
    order = torch.argsort(best_score, stable=True)[:local_n]
    cand_scores, cand_points = best_score[order], x[order]
    if group is not None:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        # an all-reduce of disjoint slots is an all-gather that works on every backend
        slot_scores = torch.zeros(world, n, dtype=x.dtype, device=x.device)
        slot_valid = torch.zeros(world, n, dtype=x.dtype, device=x.device)
        slot_points = torch.zeros(world, n, x.shape[1], dtype=x.dtype, device=x.device)
        slot_scores[rank, :local_n] = cand_scores
        slot_valid[rank, :local_n] = 1
        slot_points[rank, :local_n] = cand_points
        for t in (slot_scores, slot_valid, slot_points):
            _all_reduce(t, dist.ReduceOp.SUM, group)
        cand_scores = slot_scores.masked_fill(slot_valid == 0, math.inf).reshape(-1)
        cand_points = slot_points.reshape(-1, x.shape[1])
        keep = torch.argsort(cand_scores, stable=True)[:n]
        cand_points = cand_points[keep]
    return cand_points


def kmeans_reference(x, k, n_iters=10, spherical=True, init="random", seed=0, group=None):
    """Plain Lloyd iterations in PyTorch (float64 for float64 input, else float32)."""
    with torch.no_grad():
        centroids, assignments = _lloyd(x.detach().to(_compute_dtype(x)), k, n_iters, spherical, init, seed, group,
                                        _assign, _reference_update)
    return centroids.to(x.dtype), assignments


def _reference_update(points, assignments, k):
    """Per-centroid sums and counts of the rows assigned to it."""
    sums = torch.zeros(k, points.shape[1], dtype=points.dtype, device=points.device)
    sums.index_add_(0, assignments, points)
    return sums, torch.bincount(assignments, minlength=k).to(points.dtype)


def _global_mean(x, group):
    """The mean row of every rank's x, summed in float64."""
    sums = _all_reduce(x.sum(dim=0, dtype=torch.float64), dist.ReduceOp.SUM, group)
    return (sums / _global_rows(x.shape[0], group, x.device)).to(x.dtype)


def _lloyd(points, k, n_iters, spherical, init, seed, group, assign, update):
    """The Lloyd loop shared by the reference and the compiled kernels (assign, update).

    Euclidean: the data are centred first (the global mean row, added back to the centroids at the
    end). Euclidean k-means does not move with the data, and its score x.c - |c|^2/2 is exact only
    at the scale of the data's spread: far from the origin it would be rounded at the scale of the
    offset (in float32, data at 1000 + N(0, 1) lost most assignments).
    Empty clusters take the rows farthest from their centroids: lowest cosine (spherical; an
    all-zero row, which has no direction, never), largest |x - c| (Euclidean).
    """
    compute = points.dtype
    mean = None
    if spherical:
        points = torch.nn.functional.normalize(points, dim=1)
        no_direction = (points == 0).all(dim=1)
    else:
        mean = _global_mean(points, group)
        points = points - mean
        half_sq_norms = 0.5 * (points * points).sum(dim=1)
    if isinstance(init, torch.Tensor):
        centroids = init.detach().to(compute).clone()
        if mean is not None:
            centroids -= mean
    else:
        centroids = _random_init(points, k, seed, group)
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    for _ in range(int(n_iters)):
        best_score, assignments = assign(points, centroids, spherical)
        sums, counts = update(points, assignments, k)
        _all_reduce(sums, dist.ReduceOp.SUM, group)
        _all_reduce(counts, dist.ReduceOp.SUM, group)
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp(min=1)[:, None], centroids)
        empty = (~nonempty).nonzero()[:, 0]
        if len(empty):
            closeness = best_score.masked_fill(no_direction, math.inf) if spherical else best_score - half_sq_norms
            centroids[empty] = _farthest_points(points, closeness, len(empty), group)
        if spherical:
            centroids = torch.nn.functional.normalize(centroids, dim=1)
    _, assignments = assign(points, centroids, spherical)
    return (centroids if mean is None else centroids + mean), assignments
