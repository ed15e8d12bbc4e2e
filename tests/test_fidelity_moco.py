"""moco.py against float64 re-derivations of the official MoCo code (builder.py, main_moco.py): the InfoNCE loss
and its gradient with a random-initialised and a partly filled queue, the enqueue and its pointer, the momentum
update, the random queue's initialisation, and the recipe defaults. Odd sizes throughout."""
import copy
import math

import pytest
import torch

import moco
from common import augment, cli


def _args(*extra):
    return moco.resolve_version_defaults(cli.parse_args(moco.Args, moco.PRESETS, [
        "--arch", "resnet18", "--hidden-dim", "24", "--embedding-dim", "13", "--queue-size", "39", *extra]))


def _unit(*shape, generator=None):
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def _reference_loss_and_grads(q, k, negatives, temperature):
    """builder.py's logits [q.k+, q.queue] / T with cross-entropy against column 0, averaged over the N queries,
    and its gradients written out by hand: with p the softmax of a row, dL/dq_i = ((p_i0 - 1) k_i + sum_j p_ij
    queue_j) / (N T), dL/dk_i = (p_i0 - 1) q_i / (N T); the queue gets none (builder.py detaches it)."""
    n = len(q)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / temperature
    top = logits.max(dim=1, keepdim=True).values
    p = torch.exp(logits - top)
    p = p / p.sum(dim=1, keepdim=True)
    loss = (-torch.log(p[:, 0])).mean()
    grad_q = ((p[:, :1] - 1) * k + p[:, 1:] @ negatives) / (n * temperature)
    grad_k = (p[:, :1] - 1) * q / (n * temperature)
    return loss, grad_q, grad_k


@pytest.mark.parametrize("start", ["random", "partly_filled"])
def test_moco_fidelity_loss_and_gradient_match_the_original_formula(start):
    """The loss the training step computes (moco_loss over MoCo.negatives()) equals builder.py's cross-entropy over
    [l_pos, l_neg] / T, in value and gradient, for the random start (all K unit vectors are negatives from the first
    step) and for --queue-init empty after 2 batches of 7 keys (only those 14 are negatives)."""
    gen = torch.Generator().manual_seed(11)
    n, d, k_size = 7, 13, 21
    if start == "random":
        model = moco.MoCo(_args("--queue-size", str(k_size), "--seed", "5")).double()
        assert int(model.queue_filled) == k_size
    else:
        model = moco.MoCo(_args("--queue-size", str(k_size), "--queue-init", "empty")).double()
        for _ in range(2):
            model.enqueue(_unit(n, d, generator=gen))
    negatives = model.negatives()
    assert len(negatives) == (k_size if start == "random" else 2 * n)
    torch.testing.assert_close(negatives, model.queue[:len(negatives)], rtol=0, atol=0)
    assert not negatives.requires_grad  # a copy of a buffer: the queue gets no gradient
    for temperature in (0.2, 0.07, 0.37):
        q = _unit(n, d, generator=gen).requires_grad_()
        k = _unit(n, d, generator=gen).requires_grad_()
        queue = negatives.clone().requires_grad_()
        loss = moco.moco_loss(q, k, queue, temperature)
        grad_q, grad_k, grad_queue = torch.autograd.grad(loss, (q, k, queue), allow_unused=True)
        ref_loss, ref_q, ref_k = _reference_loss_and_grads(q.detach(), k.detach(), negatives, temperature)
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_q, ref_q, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(grad_k, ref_k, rtol=1e-10, atol=1e-13)


def test_moco_fidelity_step_zero_loss_of_the_random_start_is_near_log_k_plus_one():
    """At step 0 the random start's negatives are unrelated to the queries: each q.queue_j is ~ N(0, 1/d), so
    E exp(q.queue_j / T) = exp(1 / (2 d T^2)) and the loss is close to ln(exp(l_pos / T) + K exp(1 / (2 d T^2))) -
    l_pos / T, about ln(K + 1) for a fresh network (the empty start's first step has no negatives and a loss of 0)."""
    gen = torch.Generator().manual_seed(3)
    n, d, k_size, t = 9, 127, 999, 0.2
    queue = moco.initial_queue(k_size, d, "random", seed=4).double()
    q, k = _unit(n, d, generator=gen), _unit(n, d, generator=gen)
    loss = moco.moco_loss(q, k, queue, t)
    expected = (torch.log(torch.exp((q * k).sum(1) / t) + torch.exp(q @ queue.T / t).sum(1)) - (q * k).sum(1) / t)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-12, atol=1e-12)
    l_pos = (q * k).sum(1) / t
    predicted = (torch.log(torch.exp(l_pos) + k_size * math.exp(1 / (2 * d * t ** 2))) - l_pos).mean().item()
    assert abs(loss.item() - predicted) < 0.03, (loss.item(), predicted)
    assert moco.moco_loss(q, k, queue[:0], t).item() == 0.0


def test_moco_fidelity_enqueue_matches_the_original_round_robin():
    """builder.py keeps the queue as [d, K] and writes queue[:, ptr:ptr + B] = keys.T, ptr = (ptr + B) % K; it asserts
    K % B == 0 (B the gathered global batch), so a batch never straddles the end. Ours is the transpose, [K, d], the
    same after every step (K = 39, B = 13: the pointer wraps after 3 steps); train() rejects a K that is not a multiple
    of the global batch before the first step, and enqueue() refuses a batch that would run past the end."""
    gen = torch.Generator().manual_seed(2)
    k_size, b, d = 39, 13, 13
    model = moco.MoCo(_args("--queue-size", str(k_size), "--seed", "8")).double()
    ref_queue = model.queue.T.clone()  # [d, K], builder.py's layout
    ref_ptr = 0
    for _ in range(7):
        keys = _unit(b, d, generator=gen)
        model.enqueue(keys)
        ref_queue[:, ref_ptr:ref_ptr + b] = keys.T
        ref_ptr = (ref_ptr + b) % k_size
        torch.testing.assert_close(model.queue, ref_queue.T, rtol=0, atol=0)
        assert int(model.queue_ptr) == ref_ptr and int(model.queue_filled) == k_size
    odd = moco.MoCo(_args("--queue-size", "40")).double()
    for _ in range(3):
        odd.enqueue(_unit(b, d, generator=gen))  # pointer 39
    before = odd.queue.clone()
    with pytest.raises(ValueError, match="overrun the queue of 40"):
        odd.enqueue(_unit(b, d, generator=gen))
    assert torch.equal(odd.queue, before) and int(odd.queue_ptr) == 39


def test_moco_fidelity_empty_start_counts_the_filled_entries():
    """--queue-init empty: the first K / B steps use only the keys enqueued so far; once the queue is full the
    negatives are all K entries, as with the random start."""
    model = moco.MoCo(_args("--queue-size", "39", "--queue-init", "empty")).double()
    assert len(model.negatives()) == 0 and int(model.queue_filled) == 0 and torch.count_nonzero(model.queue) == 0
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        model.enqueue(_unit(13, 13, generator=gen))
        assert len(model.negatives()) == min(13 * step, 39)


def test_moco_fidelity_momentum_update_and_its_place_in_the_step():
    """builder.py: theta_k <- m theta_k + (1 - m) theta_q over parameters only (BatchNorm running statistics stay the
    key encoder's own), applied after the query forward and before the keys are encoded, at every step."""
    torch.manual_seed(0)
    model = moco.MoCo(_args()).double().train()
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.key_encoder.named_buffers():
            if "running" in name:
                b.add_(torch.rand_like(b))
    m = 0.993
    query_copy, key_copy = copy.deepcopy(model.query_encoder), copy.deepcopy(model.key_encoder)
    with torch.no_grad():
        for p_k, p_q in zip(key_copy.parameters(), query_copy.parameters()):
            p_k.copy_(m * p_k + (1 - m) * p_q)
    buffers_before = {n: b.clone() for n, b in model.key_encoder.named_buffers()}
    images = torch.randn(2, 5, 3, 33, 33, dtype=torch.float64)
    q, k = model(images[0], images[1], m, 1)
    for p, expected in zip(model.key_encoder.parameters(), key_copy.parameters()):
        torch.testing.assert_close(p, expected, rtol=1e-14, atol=1e-15)
        assert not p.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(q, query_copy(images[0]), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(k, key_copy(images[1]), rtol=1e-12, atol=1e-13)  # keys of the updated encoder
    for n, b in model.key_encoder.named_buffers():  # the running statistics moved by the key forward only
        torch.testing.assert_close(b, dict(key_copy.named_buffers())[n], rtol=1e-12, atol=1e-13)
        if "running" in n:
            assert not torch.equal(b, buffers_before[n])


def test_moco_fidelity_random_queue_initialisation():
    """builder.py: randn(d, K) normalised along d, i.e. K independent directions uniform on the unit sphere. Ours:
    [K, d] rows of standard-normal draws scaled to unit length from a generator seeded by --seed alone, so the
    queue is the same whatever the global RNG state, the rank or the world size (2 ranks = 1 process is checked by
    tests/test_moco.py), and restored exactly on resume (a buffer of the checkpoint)."""
    k_size, d, seed = 4099, 29, 7
    queue = moco.initial_queue(k_size, d, "random", seed)
    assert queue.shape == (k_size, d) and queue.dtype == torch.float32
    draws = torch.randn(k_size, d, generator=torch.Generator().manual_seed(seed)).double()
    torch.testing.assert_close(queue.double(), draws / draws.norm(dim=1, keepdim=True), rtol=0, atol=1e-7)
    torch.testing.assert_close(queue.double().norm(dim=1), torch.ones(k_size, dtype=torch.float64), rtol=0, atol=1e-6)
    # uniform directions: mean vector ~ N(0, I / (d K)), so its norm ~ 1/sqrt(K); coordinates have variance 1/d;
    # two different entries have cosine of mean 0 and variance 1/d
    x = queue.double()
    assert x.mean(dim=0).norm() < 2.5 / math.sqrt(k_size)
    torch.testing.assert_close((x ** 2).mean(dim=0), torch.full((d,), 1 / d, dtype=torch.float64), rtol=0.15, atol=0)
    cosines = (x[:-1] * x[1:]).sum(dim=1)
    assert abs(cosines.mean()) < 4 / math.sqrt(d * k_size) and abs(cosines.var() * d - 1) < 0.1
    # seeded by --seed alone: the global RNG does not move it, another seed does
    torch.manual_seed(123)
    a = moco.MoCo(_args("--queue-size", "39", "--seed", "3")).queue
    torch.manual_seed(456)
    b = moco.MoCo(_args("--queue-size", "39", "--seed", "3")).queue
    assert torch.equal(a, b) and torch.equal(a, moco.initial_queue(39, 13, "random", 3))
    assert not torch.equal(a, moco.MoCo(_args("--queue-size", "39", "--seed", "4")).queue)


def test_moco_fidelity_recipe_defaults():
    """The defaults against main_moco.py (v2: --mlp --moco-t 0.2 --aug-plus --cos; v1: its plain defaults) and the
    MoCo v2 paper; deviations are listed in moco.py's docstring."""
    v2 = _args()
    defaults = moco.resolve_version_defaults(moco.Args())
    assert (defaults.lr, defaults.momentum, defaults.weight_decay, defaults.queue_size, defaults.key_momentum,
            defaults.epochs, defaults.embedding_dim, defaults.hidden_dim) == (0.03, 0.9, 1e-4, 65536, 0.999, 200, 128,
                                                                             2048)
    assert defaults.batch_size * 8 == 256 and defaults.queue_init == "random" and defaults.warmup_epochs == 0
    assert defaults.temperature == 0.2 and defaults.lr_schedule == "cosine" and defaults.blur_p == 0.5
    v1 = moco.resolve_version_defaults(moco.Args(v1=True))
    assert v1.temperature == 0.07 and v1.lr_schedule == "step" and v1.lr_milestones == (120, 160) and v1.blur_p == 0
    # MLP head: Linear(2048, 2048) + ReLU + Linear(2048, 128), biases, no BatchNorm; v1 one Linear
    head = moco.Encoder(v2).head
    assert [type(m) for m in head] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert all(m.bias is not None for m in head if isinstance(m, torch.nn.Linear))
    # torchvision's ResNet init (zero_init_residual False, as models.__dict__[arch](num_classes=dim))
    trunk = moco.Encoder(v2).trunk
    assert all(torch.equal(b.bn2.weight, torch.ones_like(b.bn2.weight)) for b in trunk.layer1)
    # aug+ (v2) and InstDisc's augmentation (v1), bilinear crops: the query and key views are two draws of one
    # augment.View, whose fields are torchvision's arguments, applied in augment.apply's fixed order (crop, flip,
    # [grayscale if grayscale_first], RandomApply([ColorJitter], jitter_p), grayscale, blur, normalise)
    (count, view), = moco.view_recipe(moco.resolve_version_defaults(moco.Args()))
    assert count == 2 and type(view) is augment.View
    assert view.resize_size is None and view.scale == (0.2, 1.0) and view.size == 224  # RandomResizedCrop
    assert view.interpolation == "bilinear"
    assert view.jitter == (0.4, 0.4, 0.4, 0.1) and view.jitter_p == 0.8  # RandomApply([ColorJitter(...)], p=0.8)
    factors = view.batched().sample_params(torch.tensor([[64, 64]] * 4000), 1,
                                           torch.Generator().manual_seed(0))["jitter"]["factors"]
    for k, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):  # ColorJitter's ranges
        assert low <= factors[:, k].min() < low + 0.01 and high - 0.01 < factors[:, k].max() <= high
    assert view.grayscale_p == 0.2 and not view.grayscale_first  # RandomGrayscale after the jitter
    assert view.blur_p == 0.5 and view.blur_sigma == (0.1, 2.0)  # RandomApply([GaussianBlur], p=0.5)
    assert view.flip_p == 0.5 and view.mean == (0.485, 0.456, 0.406) and view.std == (0.229, 0.224, 0.225)
    assert view.photometric_p == 0 and view.solarize_p == 0  # nothing else
    (count1, view1), = moco.view_recipe(v1)
    assert count1 == 2 and view1.grayscale_first and view1.grayscale_p == 0.2  # RandomGrayscale, then ColorJitter
    assert view1.jitter == (0.4, 0.4, 0.4, 0.4) and view1.jitter_p == 1.0  # ColorJitter(0.4, ...) always, hue 0.4
    assert view1.blur_p == 0 and view1.interpolation == "bilinear"  # no RandomApply, no GaussianBlur


def test_moco_fidelity_learning_rate_schedules():
    """v2 (--cos): 0.5 lr (1 + cos(pi t)); v1: lr, /10 from epoch 120, /100 from epoch 160 (main_moco.py's
    adjust_learning_rate, per epoch there; per step here, which for the step schedule is the same)."""
    steps_per_epoch, epochs, peak = 7, 200, 0.03
    total = steps_per_epoch * epochs
    v1 = moco.resolve_version_defaults(moco.Args(v1=True))
    v2 = moco.resolve_version_defaults(moco.Args())
    for step in (0, 1, 839, 840, 841, 1119, 1120, 1399):
        epoch = step // steps_per_epoch
        expected_v1 = peak * (0.1 if epoch >= 120 else 1) * (0.1 if epoch >= 160 else 1)
        assert moco.learning_rate(step, steps_per_epoch, total, 0, peak, v1) == pytest.approx(expected_v1, rel=1e-12)
        expected_v2 = 0.5 * peak * (1 + math.cos(math.pi * step / total))
        assert moco.learning_rate(step, steps_per_epoch, total, 0, peak, v2) == pytest.approx(expected_v2, rel=1e-12)
