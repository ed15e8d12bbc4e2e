"""moco.py: the loss against VISSL's formula, Shuffling BN, the momentum update and the queue,
learning on a fixed batch, 2 ranks = 1 process, exact resume, bad input."""
import copy
import math

import pytest
import torch
import torchvision

import moco
from common import augment, cli, data
from tests.helpers import MOCO_SMALL, metrics, run_script, run_torchrun

SMALL = MOCO_SMALL


def tiny_args(*extra):
    return moco.resolve_version_defaults(cli.parse_args(moco.Args, moco.PRESETS, [
        "--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16", "--queue-size", "32", *extra]))


def vissl_moco_loss(q, k, queue, temperature):
    """VISSL's moco_loss: logits [l_pos, l_neg] / T, cross-entropy with target 0."""
    l_pos = torch.einsum("nc,nc->n", q, k)[:, None]
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return torch.nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def test_loss_equals_vissl_formula_and_its_gradient():
    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=1)
    q, k, queue = unit(7, 5).requires_grad_(), unit(7, 5).requires_grad_(), unit(40, 5)
    for t in (0.2, 0.07, 1.0):
        ours = moco.moco_loss(q, k, queue, t)
        ref = vissl_moco_loss(q, k, queue, t)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        g_ours = torch.autograd.grad(ours, (q, k))
        g_ref = torch.autograd.grad(ref, (q, k))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_momentum_update_and_queue_wraps_around():
    torch.manual_seed(0)
    model = moco.MoCo(tiny_args("--queue-init", "empty"))
    with torch.no_grad():
        for p in model.query_encoder.parameters():
            p.add_(1.0)
    before_q = [p.clone() for p in model.query_encoder.parameters()]
    before_k = [p.clone() for p in model.key_encoder.parameters()]
    model.momentum_update(0.9)
    for pk, bk, bq in zip(model.key_encoder.parameters(), before_k, before_q):
        torch.testing.assert_close(pk, 0.9 * bk + 0.1 * bq)
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
    keys = [torch.full((16, 16), float(i + 1)) for i in range(3)]  # queue of 32
    assert len(model.negatives()) == 0  # the empty start: no negatives at the first step
    model.enqueue(keys[0])
    assert int(model.queue_filled) == 16 and torch.equal(model.negatives(), keys[0])
    model.enqueue(keys[1])
    assert int(model.queue_ptr) == 0 and (model.queue[:16] == 1).all() and (model.queue[16:] == 2).all()
    model.enqueue(keys[2])  # replaces the oldest
    assert int(model.queue_ptr) == 16 and (model.queue[:16] == 3).all() and (model.queue[16:] == 2).all()
    assert int(model.queue_filled) == 32 and torch.equal(model.negatives(), model.queue)
    # the default random start: all 32 unit vectors are negatives from the first step, replaced oldest first
    model = moco.MoCo(tiny_args())
    initial = model.queue.clone()
    assert int(model.queue_filled) == 32 and torch.equal(model.negatives(), initial)
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(32))
    model.enqueue(keys[0])
    assert int(model.queue_ptr) == 16 and (model.queue[:16] == 1).all() and torch.equal(model.queue[16:], initial[16:])


def test_first_step_without_negatives_has_zero_loss_and_gradient():
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    loss = moco.moco_loss(q, k, torch.empty(0, 8, dtype=torch.float64), 0.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


def test_shuffling_bn_encodes_each_chunk_of_the_permuted_batch_and_unshuffles():
    torch.manual_seed(0)
    model = moco.MoCo(tiny_args()).train()
    images = torch.randn(8, 3, 32, 32)
    # one chunk: BatchNorm over the whole batch, which a permutation does not change
    torch.testing.assert_close(model.encode_keys(images, 1), model.key_encoder(images), rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    keys = model.encode_keys(images, 4)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    expected = torch.empty(8, 16)
    for chunk in perm.chunk(4):
        expected[chunk] = model.key_encoder(images[chunk])
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    # and the chunks really have their own statistics: 4 chunks differ from one batch
    assert (keys - model.key_encoder(images)).abs().max() > 1e-3


def test_split_batch_norm_equals_batch_norm_per_chunk_in_one_pass():
    """Outputs and gradients equal nn.BatchNorm2d applied to each contiguous chunk; the running statistics
    move by the mean of the chunks' updates; eval mode is plain BatchNorm; the state loads into torchvision."""
    torch.manual_seed(0)
    x = (torch.randn(12, 5, 3, 2, dtype=torch.float64) * 3 + 1).requires_grad_()
    reference = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2)
        reference.bias.uniform_(-1, 1)
    split = moco.split_batch_norms(torch.nn.Sequential(copy.deepcopy(reference)))[0]
    assert type(split) is moco.SplitBatchNorm2d
    split.splits = 3
    out = split(x)
    chunks = [copy.deepcopy(reference) for _ in range(3)]
    expected = torch.cat([bn(c) for bn, c in zip(chunks, x.chunk(3))])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    grad_split = torch.autograd.grad((out * weights).sum(), [x, split.weight, split.bias])
    grad_chunks = torch.autograd.grad((expected * weights).sum(), [x] + [p for bn in chunks for p in (bn.weight,
                                                                                                     bn.bias)])
    torch.testing.assert_close(grad_split[0], grad_chunks[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_split[1], sum(grad_chunks[1::2]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_split[2], sum(grad_chunks[2::2]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.running_mean, sum(bn.running_mean for bn in chunks) / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(split.running_var, sum(bn.running_var for bn in chunks) / 3, rtol=1e-12, atol=0)
    split.eval()
    plain = torch.nn.BatchNorm2d(5).double().eval()
    plain.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not split into 3"):
        split.train()(x[:10])


def test_loss_falls_on_a_fixed_batch():
    """Against a fixed queue of random unit keys: enqueuing keys of the same 32 images would make stale
    copies of each positive into negatives, which a fixed batch cannot learn to beat."""
    torch.manual_seed(0)
    args = tiny_args("--image-size", "32", "--blur-p", "0", "--queue-size", "64", "--key-momentum", "0.9")
    model = moco.MoCo(args)
    fixed_queue = torch.nn.functional.normalize(torch.randn(64, args.embedding_dim), dim=1)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(moco.view_recipe(args)), seed=0)
    queries, keys = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    losses = []
    model.train()
    for _ in range(8):
        q, k = model(queries, keys, args.key_momentum, 4)
        loss = moco.moco_loss(q, k, fixed_queue, args.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses


def test_two_ranks_equal_one_process_with_shuffled_chunks(tmp_path):
    """2 ranks x 1 Shuffling-BN chunk == 1 process x 2 chunks with the same permutation; same queue after. Both
    ranks start from the same random queue, which is the one a single process builds from the same --seed (under
    another global RNG state), and the step's 12 gathered keys replace its first 12 entries."""
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_moco_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = moco.resolve_version_defaults(cli.parse_args(moco.Args, None, [
        "--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16", "--queue-size", "36"]))
    torch.manual_seed(5)
    model = moco.MoCo(args).double()
    assert torch.equal(saved["initial_queues"][0], saved["initial_queues"][1])
    torch.testing.assert_close(saved["initial"]["queue"], model.queue, rtol=0, atol=0)
    assert int(saved["initial"]["queue_filled"]) == 36
    model.load_state_dict(saved["initial"])
    n, world = saved["n_per_rank"], saved["world_size"]
    query_images, key_images = saved["images"]
    # without SyncBN the query encoder normalises each rank's half on its own
    q = torch.cat([model.query_encoder(query_images[r * n:(r + 1) * n]) for r in range(world)])
    model.momentum_update(0.9)
    torch.manual_seed(1)
    k = model.encode_keys(key_images, world)
    loss = moco.moco_loss(q, k, model.negatives(), 0.2)
    loss.backward()
    model.enqueue(k)
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-8, atol=1e-11, msg=name)
    torch.testing.assert_close(saved["queue"], model.queue, rtol=1e-10, atol=1e-12)
    assert saved["queue_ptr"] == int(model.queue_ptr) == 12 and saved["queue_filled"] == int(model.queue_filled) == 36
    torch.testing.assert_close(model.queue[12:], saved["initial"]["queue"][12:], rtol=0, atol=0)
    for name, v in model.key_encoder.state_dict().items():
        if v.is_floating_point() and "running" not in name:
            torch.testing.assert_close(saved["key_encoder"][name], v, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("queue_init", ["random", "empty"])
def test_interrupted_run_resumes_exactly(tmp_path, queue_init):
    """Stopped after 3 steps (the random start's queue holds 48 keys and 16 of its initial vectors; the empty start's
    48 keys of 64) and resumed: the same losses and queue as an uninterrupted run."""
    small = [*SMALL, "--queue-init", queue_init]
    run_script("moco.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("moco.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("moco.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # bit-identical: the queue after 3 steps was restored; epoch boundary at step 7
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    ref = torch.load(tmp_path / "full" / "checkpoint-00000009.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "moco" and ckpt["step"] == 9 and ckpt["queue_ptr"] == (9 * 16) % 64
    torch.testing.assert_close(ckpt["model"]["queue"], ref["model"]["queue"], rtol=0, atol=0)
    assert int(ckpt["model"]["queue_filled"]) == 64


def test_v1_switches_head_temperature_blur_and_schedule():
    args = tiny_args("--v1")
    assert args.temperature == 0.07 and args.blur_p == 0.0 and args.lr_schedule == "step"
    assert tiny_args("--v1", "--lr-schedule", "cosine").lr_schedule == "cosine"
    assert len(moco.Encoder(args).head) == 1  # one linear layer
    assert tiny_args("--v1", "--temperature", "0.1").temperature == 0.1
    v2 = tiny_args()
    assert v2.temperature == 0.2 and v2.blur_p == 0.5 and v2.lr_schedule == "cosine" and len(moco.Encoder(v2).head) == 3
    assert len(moco.Encoder(tiny_args("--hidden-dim", "0")).head) == 1  # v2 with a linear head


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--queue-size", "128"], "must be smaller than the 120 training images"),  # 3% of cifar10-mini
        (["--data", "/no/such/dir"], "does not exist"),
    ]
    for extra, message in cases:
        proc = run_script("moco.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
