"""swav.py: the loss against the swav repository's code, learning on a fixed batch, 2 ranks = 1 process
(Sinkhorn over the global batch and the queue), prototypes frozen then trained, exact resume with a
queue, bad input."""
import math

import torch
import torchvision

import swav
from common import augment, cli, data, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--crops", "2x32,2x16",
         "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--n-prototypes", "20", "--blur-p", "0",
         "--workers", "0", "--epochs", "2", "--warmup-epochs", "1", "--queue-length", "32", "--epoch-queue-starts", "1",
         "--print-every", "1"]


def swav_repo_loss(output, bs, n_crops, crops_for_assign, temperature, epsilon, iters, queue_scores=None):
    """facebookresearch/swav main_swav.py's loss and distributed_sinkhorn (one process), verbatim in spirit."""
    def sinkhorn(out):
        Q = torch.exp(out / epsilon).t()
        K, B = Q.shape
        Q /= torch.sum(Q)
        for _ in range(iters):
            Q /= torch.sum(Q, dim=1, keepdim=True)
            Q /= K
            Q /= torch.sum(Q, dim=0, keepdim=True)
            Q /= B
        Q *= B
        return Q.t()

    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id:bs * (crop_id + 1)].detach()
            if queue_scores is not None:
                out = torch.cat([queue_scores[i], out])
            q = sinkhorn(out)[-bs:]
        subloss = 0
        for v in [v for v in range(n_crops) if v != crop_id]:
            x = output[bs * v:bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * torch.nn.functional.log_softmax(x, dim=1), dim=1))
        loss += subloss / (n_crops - 1)
    return loss / len(crops_for_assign)


def test_loss_equals_the_swav_repository_code():
    torch.manual_seed(0)
    n, n_crops, k = 6, 5, 7
    z = torch.nn.functional.normalize(torch.randn(n_crops * n, 4, dtype=torch.float64), dim=1)
    prototypes = torch.nn.functional.normalize(torch.randn(k, 4, dtype=torch.float64), dim=1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(2, 12, 4, dtype=torch.float64), dim=2)
    for crops_for_assign, with_queue in (((0, 1), False), ((0, 1), True), ((1,), False)):
        queue_scores = queue @ prototypes.detach().t() if with_queue else None
        scores = z @ prototypes.t()
        ours = swav.swav_loss(scores, n_crops, crops_for_assign, 0.1, 0.05, 3, queue_scores)
        ref = swav_repo_loss(scores, n, n_crops, crops_for_assign, 0.1, 0.05, 3, queue_scores)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ours, prototypes, retain_graph=True)[0],
                                   torch.autograd.grad(ref, prototypes)[0],
                                   rtol=1e-8, atol=1e-12)


def test_model_outputs_unit_embeddings_and_fp32_scores():
    torch.manual_seed(0)
    args = cli.parse_args(swav.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "8",
                                            "--n-prototypes", "5"])
    model = swav.SwAV(args)
    model.normalize_prototypes()
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, scores = model([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)])
    assert z.shape == (12, 8) and scores.shape == (12, 5) and scores.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(12))


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(swav.Args, swav.PRESETS, ["--preset", "cifar", "--no-cifar-stem", "--hidden-dim", "128",
                                                    "--n-prototypes", "30", "--crops", "2x32,2x16"])
    model = swav.SwAV(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(swav.view_recipe(args)), seed=0)
    crops = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 4 crops
    opt = optim.LARS(optim.param_groups(model, 1e-6, exclude_bias_and_norm=False), lr=1.0, momentum=0.9)
    losses = []
    model.train()
    for _ in range(8):
        model.normalize_prototypes()
        loss = swav.swav_loss(model(crops)[1], 4, (0, 1), 0.1, 0.05, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """Sinkhorn's all-reduce over ranks (with each rank's part of the queue) = Sinkhorn on the concatenation."""
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_swav_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(swav.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16",
                                            "--n-prototypes", "10", "--crops", "2x32,2x16"])
    model = swav.SwAV(args).double()
    model.load_state_dict(saved["initial"])
    n, world, crops = saved["n_per_rank"], saved["world_size"], saved["crops"]
    # the trunk normalises each rank's half on its own (no SyncBN on CPU); the loss sees the global batch
    halves = [model([c[r * n:(r + 1) * n] for c in crops])[1].reshape(len(crops), n, -1) for r in range(world)]
    scores = torch.cat(halves, dim=1).reshape(len(crops) * n * world, -1)
    loss = swav.swav_loss(scores, len(crops), (0, 1), 0.1, 0.05, 3, saved["queue"] @ model.prototypes.weight.t())
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-8, atol=1e-11, msg=name)


def test_interrupted_run_with_a_queue_resumes_exactly_and_prototypes_wait_one_epoch(tmp_path):
    run_script("swav.py", *SMALL, "--output-dir", tmp_path / "full", "--max-steps", "11", "--keep-checkpoints", "0",
               "--checkpoint-every", "2")
    run_script("swav.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "9")
    resumed = run_script("swav.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "11")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 12))
    assert full == split  # bit-identical: the queue (filled at steps 8-9, used from step 10) was restored
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "full")}  # warmup: np.linspace(start, peak, 7 steps)
    assert lrs[1] < lrs[7] == lrs[8] == max(lrs.values()) and lrs[11] < lrs[8]
    ckpt = {s: torch.load(tmp_path / "full" / f"checkpoint-{s:08d}.pth", weights_only=False) for s in (2, 6)}
    split11 = torch.load(tmp_path / "split" / "checkpoint-00000011.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(split11["trunk"])
    assert split11["method"] == "swav" and split11["queue"].shape == (2, 32, 32) and split11["queue_rows"] == 64
    # epoch 0 (steps 1-7): prototypes only re-normalised (rounding-level changes), never updated; epoch 1 (steps
    # 8-11, the end of the run): they learn
    torch.testing.assert_close(ckpt[2]["prototypes"], ckpt[6]["prototypes"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt[2]["prototypes"].norm(dim=1), torch.ones(20))
    assert (split11["prototypes"] - ckpt[6]["prototypes"]).abs().max() > 1e-4


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--batch-size", "100000", "--queue-length", "0"], "larger than this process's share"),
    ]
    for extra, message in cases:
        proc = run_script("swav.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_exclude_bias_and_norm_moves_biases_and_bn_to_a_plain_sgd_group(tmp_path):
    """Default: LARC on every parameter (the swav repository); the flag: SimCLR's groups (plain SGD, no decay)."""
    for flag, plain_params in (([], 0), (["--exclude-bias-and-norm"], 1)):
        run_script("swav.py", *SMALL, "--max-steps", "1", "--output-dir", tmp_path / str(plain_params), *flag)
        state = torch.load(next((tmp_path / str(plain_params)).glob("checkpoint-*.pth")), weights_only=False)
        decayed, plain = state["optimizer"]["param_groups"]
        assert decayed["lars"] and decayed["weight_decay"] > 0
        assert not plain["lars"] and plain["weight_decay"] == 0.0
        assert (len(plain["params"]) > 0) == bool(plain_params), (flag, len(plain["params"]))
