"""The pure-PyTorch references of common/ops.py against naive float64 formulas (values and gradients)."""

import pytest
import torch

from common import ops
from tests.helpers import swav_sinkhorn


@pytest.mark.parametrize("b, k", [(1, 7), (7, 1), (37, 11), (1031, 97)])
@pytest.mark.parametrize("epsilon, n_iters", [(0.05, 3), (0.5, 1), (0.02, 10)])
def test_sinkhorn_reference_equals_swav_formula(b, k, epsilon, n_iters):
    torch.manual_seed(b * k)
    scores = torch.nn.functional.normalize(torch.randn(b, k, dtype=torch.float64), dim=1)
    expected = swav_sinkhorn(scores, epsilon, n_iters)
    got = ops.sinkhorn_reference(scores, epsilon, n_iters)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(b, dtype=torch.float64))


def test_sinkhorn_reference_survives_where_swav_overflows():
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(301, 53), dim=1)
    naive = swav_sinkhorn(scores, 0.005, 3)  # exp(200) overflows float32
    assert not torch.isfinite(naive).all()
    got = ops.sinkhorn(scores, 0.005, 3)
    assert torch.isfinite(got).all()
    # the float64 naive formula is still finite at these values (exp(200) ~ 1e87): compare with it
    truth = swav_sinkhorn(scores.double(), 0.005, 3)
    torch.testing.assert_close(got.double(), truth, rtol=1e-4, atol=1e-6)


def naive_contrastive(q, k, pos, temperature, self_index=None):
    losses = []
    for i in range(len(q)):
        logits = [(q[i] @ k[j]) / temperature for j in range(len(k)) if self_index is None or j != self_index[i]]
        losses.append(torch.logsumexp(torch.stack(logits), 0) - q[i] @ k[pos[i]] / temperature)
    return torch.stack(losses)


@pytest.mark.parametrize("n, m", [(1, 3), (7, 7), (37, 101)])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_contrastive_reference_values_and_gradients(n, m, temperature):
    torch.manual_seed(n + m)
    q = torch.nn.functional.normalize(torch.randn(n, 5, dtype=torch.float64), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(m, 5, dtype=torch.float64), dim=1).requires_grad_()
    pos = torch.randint(0, m, (n,))
    self_index = (pos + 1 + torch.randint(0, m - 1, (n,))) % m if m > 1 else None
    for reduction in ("none", "sum", "mean"):
        got = ops.contrastive_loss(q, k, pos, temperature, self_index, reduction)
        per_row = naive_contrastive(q, k, pos, temperature, self_index)
        expected = {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad(ops.contrastive_loss(q, k, pos, temperature, self_index), (q, k))
    expected_grads = torch.autograd.grad(naive_contrastive(q, k, pos, temperature, self_index).mean(), (q, k))
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)
    if n * m <= 64:  # finite differences cost O((n + m) * d) loss evaluations
        assert torch.autograd.gradcheck(lambda a, b: ops.contrastive_loss(a, b, pos, temperature, self_index), (q, k))


def naive_kmeans(x, centroids, n_iters, spherical):
    """Lloyd's algorithm point by point (float64); empty clusters keep their centroid."""
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
        centroids = torch.nn.functional.normalize(centroids, dim=1)

    def assign():
        if spherical:
            return torch.stack([torch.argmax(centroids @ p) for p in x])
        return torch.stack([torch.argmin(((centroids - p) ** 2).sum(1)) for p in x])

    for _ in range(n_iters):
        labels = assign()
        new = centroids.clone()
        for c in range(len(centroids)):
            members = x[labels == c]
            if len(members):
                new[c] = members.mean(0)
        centroids = torch.nn.functional.normalize(new, dim=1) if spherical else new
    return centroids, assign()


@pytest.mark.parametrize("spherical", [True, False])
@pytest.mark.parametrize("n, k", [(37, 5), (1009, 13)])
def test_kmeans_reference_equals_lloyd(spherical, n, k):
    torch.manual_seed(n)
    x = torch.randn(n, 6, dtype=torch.float64) + 3 * torch.randn(k, 6, dtype=torch.float64)[torch.randint(0, k, (n,))]
    init = x[torch.randperm(n)[:k]].clone()
    centroids, labels = ops.kmeans(x, k, n_iters=7, spherical=spherical, init=init)
    expected_centroids, expected_labels = naive_kmeans(x, init, 7, spherical)
    if torch.bincount(expected_labels, minlength=k).min() > 0:  # no re-seeding happened: must agree exactly
        torch.testing.assert_close(centroids, expected_centroids, rtol=1e-10, atol=1e-10)
        assert torch.equal(labels, expected_labels)
    assert torch.bincount(labels, minlength=k).min() > 0


def test_kmeans_reseeds_empty_clusters_with_farthest_points():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0]], dtype=torch.float64)
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, -50.0]], dtype=torch.float64)
    centroids, labels = ops.kmeans(x, 3, n_iters=3, spherical=False, init=init)
    assert torch.bincount(labels, minlength=3).min() > 0
    assert any(torch.allclose(c, x[3]) for c in centroids)  # the far point became a centroid
    assert torch.isfinite(centroids).all()


def test_kmeans_random_init_is_seeded():
    x = torch.randn(500, 8)
    a = ops.kmeans(x, 10, seed=3)[0]
    assert torch.equal(a, ops.kmeans(x, 10, seed=3)[0])
    assert not torch.equal(a, ops.kmeans(x, 10, seed=4)[0])


@pytest.mark.parametrize("call, message", [
    (lambda: ops.sinkhorn(torch.randn(3), 0.05), "2-D"),
    (lambda: ops.sinkhorn(torch.randn(3, 4), -1.0), "epsilon"),
    (lambda: ops.sinkhorn(torch.randint(0, 3, (3, 4)), 0.05), "floating-point"),
    (lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long), 0.1), "feature size"),
    (lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 5]), 0.1), "outside"),
    (lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 0.0), "temperature"),
    (lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), 0.1,
                                  torch.zeros(3, dtype=torch.long)), "differ"),
    (lambda: ops.contrastive_loss(torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=torch.long), 0.1), "dtype"),
    (lambda: ops.kmeans(torch.randn(5, 4), 6), "at least k"),
    (lambda: ops.kmeans(torch.randn(5, 4), 2, init=torch.randn(3, 4)), "init centroids"),
])
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
