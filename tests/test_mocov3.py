"""mocov3.py: the loss against the official formula in float64, the ViT's initialisation and position
embeddings, the momentum schedule, 2 processes against 1, exact resume, bad input."""
import math

import pytest
import torch
import torchvision

import mocov3
from common import cli, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--preset", "cpu", "--data-fraction", "0.03", "--batch-size", "16", "--hidden-dim", "64",
         "--embedding-dim", "32", "--workers", "0", "--epochs", "2", "--print-every", "1"]


def naive_ctr(q, k, temperature):
    """builder.py's ctr_loss on one process, one query at a time, float64: -log softmax(q_i . k / tau)[i] * 2 tau,
    averaged over the queries, q and k L2-normalised."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(len(q)):
        logits = torch.stack([q[i] @ k[j] / temperature for j in range(len(k))])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / len(q) * 2 * temperature


@pytest.mark.parametrize("temperature,scale", [(0.2, 1.0), (1.0, 1.0), (0.05, 1e4), (0.2, 1e-4)])
def test_loss_and_gradients_equal_the_official_formula(temperature, scale):
    gen = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = [(torch.randn(7, 5, generator=gen, dtype=torch.float64) * scale).requires_grad_()
                      for _ in range(4)]
    ours = mocov3.mocov3_loss([q1, q2], [k1, k2], temperature)
    ours_grads = torch.autograd.grad(ours, [q1, q2, k1, k2], allow_unused=True)
    a1, a2 = q1.detach().clone().requires_grad_(), q2.detach().clone().requires_grad_()
    expected = naive_ctr(a1, k2.detach(), temperature) + naive_ctr(a2, k1.detach(), temperature)
    expected_grads = torch.autograd.grad(expected, [a1, a2])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours_grads[:2], expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 / scale)
    assert ours_grads[2] is None and ours_grads[3] is None  # the keys are the momentum encoder's: no gradient


def test_sincos_position_embedding_equals_the_official_table():
    grid, dim, temperature = 3, 8, 10000.0
    table = mocov3.sincos_position_embedding(grid, dim, temperature)[0].double()
    assert table.shape == (1 + grid * grid, dim) and torch.equal(table[0], torch.zeros(dim, dtype=torch.float64))
    for row in range(grid):
        for col in range(grid):
            token = table[1 + row * grid + col]
            for i in range(dim // 4):
                omega = temperature ** (-i / (dim // 4))
                expected = [math.sin(row * omega), math.cos(row * omega), math.sin(col * omega), math.cos(col * omega)]
                got = [token[i], token[dim // 4 + i], token[dim // 2 + i], token[3 * dim // 4 + i]]
                assert all(math.isclose(g, e, abs_tol=1e-7) for g, e in zip(got, expected))


def test_vit_initialisation_follows_moco_v3():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32)
    mocov3.init_vit_as_moco_v3(vit, stop_grad_conv1=True)
    d = 16
    qkv = vit.encoder.layers[0].self_attention.in_proj_weight
    assert qkv.abs().max() <= math.sqrt(6 / (d + d)) and qkv.abs().max() > 0.8 * math.sqrt(6 / (d + d))
    assert float(vit.encoder.layers[0].self_attention.in_proj_bias.detach().abs().sum()) == 0
    linear = vit.encoder.layers[1].mlp[0]
    assert linear.weight.abs().max() <= math.sqrt(6 / (16 + 32)) and float(linear.bias.detach().abs().sum()) == 0
    bound = math.sqrt(6 / (3 * 16 * 16 + d))
    assert vit.conv_proj.weight.abs().max() <= bound and not vit.conv_proj.weight.requires_grad
    assert not vit.conv_proj.bias.requires_grad and float(vit.conv_proj.bias.abs().sum()) == 0
    assert vit.class_token.abs().max() < 1e-5
    assert not vit.encoder.pos_embedding.requires_grad
    torch.testing.assert_close(vit.encoder.pos_embedding.detach(), mocov3.sincos_position_embedding(2, d))


def test_momentum_rises_from_m0_to_1_along_a_half_cosine():
    assert mocov3.moco_momentum(0, 100, 0.99) == 0.99
    assert mocov3.moco_momentum(100, 100, 0.99) == 1.0
    assert math.isclose(mocov3.moco_momentum(50, 100, 0.99), 0.995, rel_tol=1e-15)


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "mocov3.pt"
    run_torchrun(2, "tests/workers/dist_siamese_worker.py", "mocov3", out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    saved = ranks[0]
    args = cli.parse_args(mocov3.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "16",
                                              "--optimizer", "lars"])
    model = mocov3.MoCoV3(args).double()
    model.load_state_dict(saved["initial"])
    n = saved["n_per_rank"]
    # each rank's half through the encoders (BatchNorm per rank); the loss contrasts every query with the keys of
    # the whole global batch, as one process holding both halves would
    halves = [model([v[r * n:(r + 1) * n] for v in saved["views"]], 0.9 if r == 0 else 1.0) for r in range(2)]
    queries = [torch.cat([h[0][v] for h in halves]) for v in range(2)]
    keys = [torch.cat([h[1][v] for h in halves]) for v in range(2)]
    loss = mocov3.mocov3_loss(queries, keys, 0.2)
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    optimizer = mocov3.build_optimizer(model, args)
    optim.set_lr(optimizer, 0.5)
    optimizer.step()
    for name, p in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["after"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    small = [*SMALL, "--gpu-aug", gpu_aug]
    run_script("mocov3.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("mocov3.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "4")
    resumed = run_script("mocov3.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # bit-identical losses, across the epoch boundary at step 7
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "mocov3" and ckpt["step"] == 9
    assert any(k.startswith("momentum_encoder.") for k in ckpt["model"])


def test_vit_trunk_keeps_its_random_patch_projection_through_a_step():
    torch.manual_seed(0)
    args = cli.parse_args(mocov3.Args, None, ["--arch", "vit_ti_16", "--hidden-dim", "32", "--embedding-dim", "16"])
    model = mocov3.MoCoV3(args)
    assert len(model.base_encoder.projector) == 8 and isinstance(model.predictor[-1], torch.nn.BatchNorm1d)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("base_encoder.trunk.") and ("conv_proj" in n or "pos_embedding" in n)}
    assert len(frozen) == 3 and not any(model.get_parameter(n).requires_grad for n in frozen)
    optimizer = mocov3.build_optimizer(model, args)
    optim.set_lr(optimizer, 1e-3)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = mocov3.mocov3_loss(*model(views, 0.99), args.temperature)
    loss.backward()
    optimizer.step()
    assert all(torch.equal(model.get_parameter(n), p) for n, p in frozen.items())
    assert not torch.equal(model.base_encoder.trunk.class_token.detach(), model.momentum_encoder.trunk.class_token)
