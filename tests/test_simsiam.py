"""simsiam.py: the loss against the paper's formula in float64, the recipe's model and schedule, 2 processes
against 1, learning on a fixed batch, exact resume, bad input."""
import math

import pytest
import torch

import simsiam
from common import augment, cli, data, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--predictor-hidden-dim", "16",
         "--workers", "0", "--epochs", "2", "--lr", "0.5", "--print-every", "1"]


def naive_simsiam_loss(p1, p2, z1, z2):
    """Algorithm 1, one image at a time, float64: D(p, z) = -p.z / (|p| |z|), L = D(p1, z2) / 2 + D(p2, z1) / 2."""
    def d(p, z):
        return -(p @ z) / (torch.sqrt(p @ p) * torch.sqrt(z @ z))

    return sum(d(p1[i], z2[i]) / 2 + d(p2[i], z1[i]) / 2 for i in range(len(p1))) / len(p1)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e6])
def test_loss_and_gradients_equal_the_paper_formula(scale):
    gen = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = [(torch.randn(7, 5, generator=gen, dtype=torch.float64) * scale).requires_grad_()
                      for _ in range(4)]
    ours = simsiam.simsiam_loss([p1, p2], [z1, z2])
    ours_grads = torch.autograd.grad(ours, [p1, p2, z1, z2], allow_unused=True)
    q1, q2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    expected = naive_simsiam_loss(q1, q2, z1.detach(), z2.detach())
    expected_grads = torch.autograd.grad(expected, [q1, q2])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads[:2], expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 / scale)
    assert ours_grads[2] is None and ours_grads[3] is None  # stop-gradient on z
    torch.testing.assert_close(simsiam.simsiam_loss([z2 * 2, z1], [z1, z2]), torch.tensor(-1.0, dtype=torch.float64))


def test_model_and_optimizer_follow_the_original():
    args = cli.parse_args(simsiam.Args, None, ["--arch", "resnet18", "--embedding-dim", "64",
                                               "--predictor-hidden-dim", "16"])
    model = simsiam.SimSiam(args)
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 64)]
    assert not norms[-1].affine and all(n.affine for n in norms[:-1])  # the output BN has no affine parameters
    assert [type(m).__name__ for m in model.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert model.predictor[-1].bias is not None and model.predictor[0].bias is None
    # zero-initialised residual BatchNorms (torchvision's zero_init_residual=True)
    assert all(float(block.bn2.weight.detach().abs().sum()) == 0 for layer in (model.trunk.layer1, model.trunk.layer4)
               for block in layer)
    optimizer = simsiam.build_optimizer(model, args)
    encoder, predictor = optimizer.param_groups
    assert predictor["fixed_lr"] and not encoder["fixed_lr"] and encoder["weight_decay"] == 1e-4
    assert len(encoder["params"]) + len(predictor["params"]) == len(list(model.parameters()))
    # the cosine is evaluated once per epoch, from the peak at epoch 0 to peak * (1 + cos(pi * 99/100)) / 2
    lr = lambda step: simsiam.learning_rate(step, 10, 1000, 0, 0.1, args)  # noqa: E731
    assert lr(0) == lr(9) == 0.1 and lr(10) == 0.1 * 0.5 * (1 + math.cos(math.pi / 100)) and lr(10) == lr(19)
    assert math.isclose(lr(999), 0.1 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_predictor_rate_fixed_and_scaled_in_groups_of_its_own(optimizer):
    """Every trainable parameter in exactly one group; the predictor's groups keep the fixed rate (--fix-pred-lr)
    times --predictor-lr-scale, the encoder's follow the schedule. SGD decays everything; LARS decays and adapts
    weights only (biases and BatchNorm parameters neither), with SimCLR's unclipped trust ratio."""
    for fix, scale in ((True, 1.0), (False, 10.0)):
        args = cli.parse_args(simsiam.Args, None, ["--arch", "resnet18", "--embedding-dim", "64", "--optimizer",
                                                   optimizer, "--predictor-hidden-dim", "16", "--weight-decay", "3e-4",
                                                   "--predictor-lr-scale", str(scale)]
                              + ([] if fix else ["--no-fix-pred-lr"]))
        model = simsiam.SimSiam(args)
        optimizer_ = simsiam.build_optimizer(model, args)
        assert isinstance(optimizer_, optim.LARS if optimizer == "lars" else torch.optim.SGD)
        predictor = {id(p) for p in model.predictor.parameters()}
        seen = []
        for group in optimizer_.param_groups:
            ids = [id(p) for p in group["params"]]
            seen += ids
            in_predictor = ids[0] in predictor
            assert all((i in predictor) == in_predictor for i in ids)
            assert group["fixed_lr"] == (fix and in_predictor) and group["lr_scale"] == (scale if in_predictor else 1)
            assert group["momentum"] == 0.9
            if optimizer == "sgd":
                assert group["weight_decay"] == 3e-4
                continue
            for p in group["params"]:
                assert group["lars"] == (p.ndim > 1) and group["weight_decay"] == (3e-4 if p.ndim > 1 else 0.0)
            assert group["trust_coefficient"] == 0.001 and not group["clip"]
        assert sorted(seen) == sorted(id(p) for p in model.parameters())


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "simsiam.pt"
    run_torchrun(2, "tests/workers/dist_siamese_worker.py", "simsiam", out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    saved = ranks[0]
    args = cli.parse_args(simsiam.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "16",
                                               "--predictor-hidden-dim", "8"])
    model = simsiam.SimSiam(args).double()
    model.load_state_dict(saved["initial"])
    n = saved["n_per_rank"]
    losses = [simsiam.simsiam_loss(*model([v[r * n:(r + 1) * n] for v in saved["views"]])) for r in range(2)]
    loss = sum(losses) / 2
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    optimizer = simsiam.build_optimizer(model, args)
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    optimizer.step()
    for name, p in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["after"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


# SGD at one rate; LARS at the cpu preset's peak for batch 64 with its predictor at 30x
@pytest.mark.parametrize("optimizer,lr,predictor_scale", [("sgd", 0.1, 1), ("lars", 0.5, 30)])
def test_loss_falls_on_a_fixed_batch(optimizer, lr, predictor_scale):
    torch.manual_seed(0)
    args = cli.parse_args(simsiam.Args, simsiam.PRESETS, ["--preset", "cpu", "--hidden-dim", "128", "--optimizer",
                                                          optimizer, "--predictor-lr-scale", str(predictor_scale),
                                                          "--embedding-dim", "64", "--predictor-hidden-dim", "16"])
    model = simsiam.SimSiam(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(simsiam.view_recipe(args)), seed=0)
    batch = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 2 views
    optimizer = simsiam.build_optimizer(model, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    losses = []
    model.train()
    for _ in range(40):
        loss = simsiam.simsiam_loss(*model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    small = [*SMALL, "--gpu-aug", gpu_aug]
    run_script("simsiam.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("simsiam.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "4")
    resumed = run_script("simsiam.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: (r["loss"], r["lr"]) for r in metrics(tmp_path / "full")}
    split = {r["step"]: (r["loss"], r["lr"]) for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # bit-identical losses, across the epoch boundary at step 7
    assert full[1][1] == full[7][1] > full[8][1]  # the per-epoch cosine moves at the epoch boundary only
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "simsiam" and ckpt["step"] == 9
