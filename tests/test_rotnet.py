"""rotnet.py: the rotated batch and its labels, learning on a fixed batch, exact resume, bad input."""
import math

import torch
import torchvision

import rotnet
from common import augment, cli, data, optim
from tests.helpers import metrics, run_script

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.01", "--arch", "resnet18", "--crop-size", "32",
         "--batch-size", "16", "--workers", "0", "--epochs", "3", "--lr", "0.4", "--print-every", "1"]


def test_every_image_appears_at_all_four_rotations_with_its_label():
    images = torch.randn(3, 3, 5, 5)
    rotated, labels = rotnet.rotate_batch(images, rotations=4)
    assert rotated.shape == (12, 3, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for k in range(4):
        for i in range(3):
            expected = images[i]
            for _ in range(k):  # 90 degrees counter-clockwise, k times: rows become reversed columns
                expected = expected.transpose(1, 2).flip(1)
            torch.testing.assert_close(rotated[k * 3 + i], expected, rtol=0, atol=0)


def test_one_random_rotation_per_image_matches_its_label():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 4, 4)
    rotated, labels = rotnet.rotate_batch(images, rotations=1)
    assert rotated.shape == images.shape and set(labels.tolist()) == {0, 1, 2, 3}
    for image, out, k in zip(images, rotated, labels.tolist()):
        torch.testing.assert_close(out, torch.rot90(image, k, dims=(1, 2)), rtol=0, atol=0)


def test_rotation_loss_is_the_mean_negative_log_likelihood():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 4, dtype=torch.float64), torch.randint(4, (8,))
    expected = -sum(logits[i, labels[i]] - torch.logsumexp(logits[i], 0) for i in range(8)) / 8
    torch.testing.assert_close(rotnet.rotation_loss(logits, labels), expected)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(rotnet.Args, rotnet.PRESETS, ["--preset", "cifar", "--no-cifar-stem"])
    model = rotnet.RotNet(args)
    base = data.build_dataset("cifar10-mini", "train")
    images = data.ViewDataset(base, augment.PerImage(rotnet.view_recipe(args)), seed=0)
    batch = data.collate([images[(0, i)] for i in range(0, 4000, 250)])[0][0]  # 16 images, one view
    rotated, labels = rotnet.rotate_batch(batch)
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, 5e-4), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(10):
        loss = rotnet.rotation_loss(model(rotated), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # starts near log 4 = 1.39


def test_step_schedule_and_warmup():
    args = cli.parse_args(rotnet.Args, None, ["--warmup-epochs", "1"])
    lr = [rotnet.learning_rate(s * 10, 10, 1050, 1.0, args) for s in (0, 1, 29, 30, 59, 60, 90, 100, 104)]
    assert lr[0] == 0.25 and lr[1:3] == [1.0, 1.0]
    for got, want in zip(lr[3:], [0.1, 0.1, 0.01, 1e-3, 1e-4, 1e-4]):
        assert math.isclose(got, want, rel_tol=1e-12), lr


def test_interrupted_run_resumes_exactly(tmp_path):
    # one random rotation per image: the resumed run must also restore the rotation draws
    extra = ["--rotations", "1"]
    run_script("rotnet.py", *SMALL, *extra, "--output-dir", tmp_path / "full", "--max-steps", "5")
    run_script("rotnet.py", *SMALL, *extra, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("rotnet.py", *SMALL, *extra, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across the epoch boundaries at steps 2 and 4
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000005.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "rotnet" and ckpt["step"] == 5


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--data", "/no/such/dir"], "does not exist"),
        (["--batch-size", "100000"], "larger than this process's share"),
    ]
    for extra, message in cases:
        proc = run_script("rotnet.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
