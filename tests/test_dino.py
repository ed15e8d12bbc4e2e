"""dino.py: the loss, centre, teacher and schedules against DINO's formulas in float64, the ViT pieces
(stochastic depth, initialisation, weight-normalised last layer), 2 processes against 1, exact resume with the
last layer frozen for the first epoch, bad input."""

import numpy as np
import pytest
import torch
import torchvision

import dino
from common import cli, models, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--preset", "cpu", "--data-fraction", "0.03", "--batch-size", "16", "--hidden-dim", "64", "--out-dim",
         "128", "--bottleneck-dim", "32", "--workers", "0", "--epochs", "2", "--print-every", "1"]


def naive_dino_loss(student, teacher, center, n_crops, tau_s, tau_t):
    """DINOLoss, one image and one pair of crops at a time, float64."""
    n = len(teacher) // 2
    total, terms = 0.0, 0
    for t in range(2):
        for s in range(n_crops):
            if s == t:
                continue
            pair = 0.0
            for i in range(n):
                p_t = torch.softmax((teacher[t * n + i] - center[0]) / tau_t, dim=0)
                log_p_s = torch.log_softmax(student[s * n + i] / tau_s, dim=0)
                pair = pair - (p_t * log_p_s).sum()
            total, terms = total + pair / n, terms + 1
    return total / terms


@pytest.mark.parametrize("n_crops,scale", [(2, 1.0), (5, 1.0), (4, 30.0)])
def test_loss_and_gradients_equal_dinos_formula(n_crops, scale):
    gen = torch.Generator().manual_seed(0)
    n, k = 3, 7
    student = (torch.randn(n_crops * n, k, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    teacher = (torch.randn(2 * n, k, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    center = torch.randn(1, k, generator=gen, dtype=torch.float64)
    ours = dino.dino_loss(student, teacher, center, n_crops, 0.1, 0.04)
    ours_grads = torch.autograd.grad(ours, [student, teacher], allow_unused=True)
    s2 = student.detach().clone().requires_grad_()
    expected = naive_dino_loss(s2, teacher.detach(), center, n_crops, 0.1, 0.04)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours_grads[0], torch.autograd.grad(expected, s2)[0], rtol=1e-9, atol=1e-11)
    assert ours_grads[1] is None  # no gradient through the teacher


def test_schedules_equal_dinos_numpy_schedules():
    """utils.cosine_scheduler and DINOLoss's teacher-temperature schedule, rebuilt with numpy as DINO does."""
    epochs, per_epoch, warmup = 6, 5, 2
    warm = np.linspace(0, 0.8, warmup * per_epoch)
    iters = np.arange(epochs * per_epoch - warmup * per_epoch)
    rest = 1e-3 + 0.5 * (0.8 - 1e-3) * (1 + np.cos(np.pi * iters / len(iters)))
    expected = np.concatenate((warm, rest))
    ours = [dino.cosine_schedule(i, epochs * per_epoch, 0.8, 1e-3, warmup * per_epoch) for i in range(len(expected))]
    np.testing.assert_allclose(ours, expected, rtol=1e-13, atol=1e-15)
    momentum = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * np.arange(30) / 30))
    np.testing.assert_allclose([dino.cosine_schedule(i, 30, 0.996, 1.0) for i in range(30)], momentum, rtol=1e-14)
    args = cli.parse_args(dino.Args, None, ["--epochs", "50", "--warmup-teacher-temp-epochs", "30"])
    temps = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(20) * 0.07))
    np.testing.assert_allclose([dino.teacher_temperature(e, args) for e in range(50)], temps, rtol=1e-14)
    # the README's ResNet-50 command sets no crop or temperature flag: main_dino.py's 8 local crops, 0.04 throughout
    r50 = cli.parse_args(dino.Args, dino.PRESETS, ["--preset", "resnet50"])
    assert (r50.local_crops, r50.optimizer, r50.lr) == (8, "sgd", 0.03)
    assert r50.weight_decay == r50.weight_decay_end == 1e-4
    assert [dino.teacher_temperature(e, r50) for e in range(r50.epochs)] == [0.04] * 100


def test_head_and_centre():
    args = cli.parse_args(dino.Args, None, ["--hidden-dim", "16", "--bottleneck-dim", "8", "--out-dim", "11"])
    torch.manual_seed(0)
    head = dino.DINOHead(12, args).double()
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g,
                                                                       torch.ones(11, 1, dtype=torch.float64))
    x = torch.randn(4, 12, dtype=torch.float64)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).t())
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 11, bias=False).double())
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(v)
    torch.testing.assert_close(head.last_layer(z), reference(z))
    model = dino.DINO(cli.parse_args(dino.Args, None, ["--arch", "resnet18", "--hidden-dim", "16",
                                                       "--bottleneck-dim", "8", "--out-dim", "11"])).double()
    out = torch.randn(6, 11, dtype=torch.float64)
    model.center.fill_(0.5)
    model.update_center(out, 0.9)
    torch.testing.assert_close(model.center, 0.9 * 0.5 + 0.1 * out.mean(0, keepdim=True))


def test_vit_student_has_stochastic_depth_and_dinos_initialisation():
    torch.manual_seed(0)
    args = cli.parse_args(dino.Args, None, ["--arch", "vit_ti_16", "--hidden-dim", "16", "--bottleneck-dim", "8",
                                            "--out-dim", "11"])
    model = dino.DINO(args)
    student, teacher = model.student.trunk, model.teacher.trunk
    rates = [b.drop_prob for b in student.encoder.layers]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12), rtol=1e-6)
    assert all(type(b) is torchvision.models.vision_transformer.EncoderBlock for b in teacher.encoder.layers)
    qkv = student.encoder.layers[0].self_attention.in_proj_weight.detach()
    assert 0.015 < float(qkv.std()) < 0.025 and float(qkv.abs().max()) <= 2.0
    assert float(student.encoder.layers[0].mlp[0].bias.detach().abs().sum()) == 0
    # evaluation (and a zero rate) is the plain torchvision block; in training some samples skip a branch
    x = torch.randn(4, 5, 192)
    block, plain = student.encoder.layers[-1], teacher.encoder.layers[-1]
    block.eval(), plain.eval()
    torch.testing.assert_close(block(x), plain(x))
    block.train()
    block.drop_prob = 0.5
    torch.manual_seed(1)
    dropped = block(x)
    assert not torch.allclose(dropped, plain(x))
    # the checkpoint's trunk (the teacher's) loads into torchvision's VisionTransformer
    state = models.trunk_state_dict(teacher)
    torchvision.models.VisionTransformer(**models.vit_config("vit_ti_16")).load_state_dict(state)


def test_per_parameter_gradient_clipping():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    dino.clip_gradients(torch.nn.ParameterList([a, b]), 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0, 0.0]) / (5 + 1e-6) * 1.0)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the threshold: untouched


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "dino.pt"
    run_torchrun(2, "tests/workers/dist_siamese_worker.py", "dino", out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    saved = ranks[0]
    args = cli.parse_args(dino.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--optimizer", "sgd",
                                            "--out-dim", "24", "--bottleneck-dim", "8"])
    model = dino.DINO(args).double()
    model.load_state_dict(saved["initial"])
    n = saved["n_per_rank"]
    outs = [model([v[r * n:(r + 1) * n] for v in saved["views"]]) for r in range(2)]
    loss = sum(dino.dino_loss(s, t, model.center, 2, 0.1, 0.04) for s, t in outs) / 2
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    optimizer = dino.build_optimizer(model, args)
    optim.set_lr(optimizer, 0.5)
    optimizer.step()
    model.update_center(torch.cat([t for _, t in outs]), 0.9)  # the mean over both processes' teacher outputs
    model.update_teacher(0.9)
    for rank in ranks:
        torch.testing.assert_close(rank["after"]["center"], model.center, rtol=1e-12, atol=1e-14)
        for name, p in model.named_parameters():
            torch.testing.assert_close(rank["after"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    small = [*SMALL, "--gpu-aug", gpu_aug]
    run_script("dino.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("dino.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "4")
    resumed = run_script("dino.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # bit-identical losses, across the epoch boundary at step 7 (teacher and centre too)
    # the last layer is frozen for the first epoch (7 steps): the teacher's EMA of it stays the student's
    last = "head.last_layer.weight_v"
    early = torch.load(tmp_path / "split" / "checkpoint-00000004.pth", weights_only=False)["model"]
    late = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    torch.testing.assert_close(early[f"student.{last}"], early[f"teacher.{last}"], rtol=1e-6, atol=1e-7)
    assert (late["model"][f"student.{last}"] - late["model"][f"teacher.{last}"]).abs().max() > 1e-6
    assert float(late["model"]["center"].abs().sum()) > 0
    torchvision.models.resnet18().load_state_dict(late["trunk"])
    assert late["method"] == "dino" and late["step"] == 9
