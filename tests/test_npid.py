"""npid.py: NCE and InfoNCE against the paper's formulas, memory bank, learning, exact resume, bad input."""
import math

import pytest
import torch

import npid
from common import augment, data, optim
from tests.helpers import metrics, naive_nce, run_script, run_torchrun, unit

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--num-negatives", "64", "--workers", "0", "--epochs", "2", "--print-every", "1"]


def test_nce_loss_equals_the_paper_formula_in_float64():
    v, positives, noise = unit(6, 8, seed=0), unit(6, 8, seed=1), unit(20, 8, seed=2)
    for temperature, n_data in ((0.07, 1000), (0.5, 50), (0.1, 1_281_167)):
        z = float(npid.estimate_z(v, positives, noise, temperature, n_data))
        got = npid.nce_loss(v, positives, noise, torch.tensor(z, dtype=torch.float64), temperature, n_data)
        assert got.dtype == torch.float64
        assert abs(got.item() - naive_nce(v, positives, noise, z, temperature, n_data)) < 1e-9 * max(1, got.item())


def test_z_is_n_times_the_mean_score_over_positives_and_noise():
    v, positives, noise = unit(5, 8, seed=3), unit(5, 8, seed=9), unit(11, 8, seed=4)
    scores = [[float(v[i] @ positives[i])] + [float(v[i] @ noise[j]) for j in range(11)] for i in range(5)]
    expected = 777 * sum(math.exp(s / 0.07) for row in scores for s in row) / 60
    assert abs(npid.estimate_z(v, positives, noise, 0.07, 777).item() - expected) < 1e-9 * expected


def test_info_nce_is_cross_entropy_over_own_positive_and_noise_entries():
    v, positives, noise = unit(4, 8, seed=5), unit(4, 8, seed=6), unit(9, 8, seed=7)
    expected = sum(torch.logsumexp(torch.cat([positives[i:i + 1], noise]) @ v[i] / 0.2, 0) - positives[i] @ v[i] / 0.2
                   for i in range(4)) / 4
    torch.testing.assert_close(npid.info_nce_loss(v, positives, noise, 0.2), expected, rtol=1e-12, atol=1e-12)


def test_memory_bank_starts_on_the_unit_sphere_and_updates_with_momentum():
    bank = npid.MemoryBank(10, 8, momentum=0.5, seed=3)
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(10))
    assert torch.equal(bank.bank, npid.MemoryBank(10, 8, momentum=0.5, seed=3).bank)  # same on every rank
    before = bank.bank.clone()
    v, idx = unit(3, 8, seed=8).float(), torch.tensor([7, 0, 4])
    bank.update(v, idx)
    expected = torch.nn.functional.normalize(0.5 * before[idx] + 0.5 * v, dim=1)
    torch.testing.assert_close(bank.bank[idx], expected)
    untouched = [i for i in range(10) if i not in (7, 0, 4)]
    assert torch.equal(bank.bank[untouched], before[untouched])
    assert float(bank.z) < 0  # Z is estimated by the first training step, not at construction


def test_noise_draws_depend_on_seed_step_and_rank_only():
    a = npid.noise_indices(1000, 50, seed=0, step=3, rank=0, device="cpu")
    assert torch.equal(a, npid.noise_indices(1000, 50, seed=0, step=3, rank=0, device="cpu"))
    assert not torch.equal(a, npid.noise_indices(1000, 50, seed=0, step=4, rank=0, device="cpu"))
    assert not torch.equal(a, npid.noise_indices(1000, 50, seed=0, step=3, rank=1, device="cpu"))
    assert a.min() >= 0 and a.max() < 1000


def test_npid_plus_plus_flag_and_presets():
    plain, plus = npid.parse_args([]), npid.parse_args(["--npid++"])
    assert (plain.num_negatives, plain.epochs, plain.temperature, plain.memory_momentum) == (4096, 200, 0.07, 0.5)
    assert (plus.num_negatives, plus.epochs, plus.lr_schedule) == (32000, 800, "cosine")
    assert npid.parse_args(["--npid++", "--num-negatives", "16000"]).num_negatives == 16000
    assert npid.parse_args(["--preset", "cifar"]).arch == "resnet18"


def test_step_schedule_divides_by_ten_at_the_milestones():
    args = npid.parse_args([])
    lrs = [npid.learning_rate(e * 10, 10, 2000, 0.03, 0.0, args) for e in (0, 119, 120, 159, 160, 199)]
    for got, want in zip(lrs, [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003]):
        assert abs(got - want) < 1e-12


def test_loss_falls_on_a_fixed_batch():
    """Against a fixed memory bank and fixed noise, SGD on the network alone must lower the NCE loss."""
    torch.manual_seed(0)
    args = npid.parse_args(["--arch", "resnet18", "--image-size", "32"])
    model = npid.NPID(args)
    views = data.ViewDataset(data.build_dataset("cifar10-mini", "train"), augment.PerImage(npid.view_recipe(args)),
                             seed=0)
    images = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0][0]  # 32 images, one view
    memory = npid.MemoryBank(4000, 128, 0.5, seed=0)
    indices = torch.arange(0, 4000, 125)
    noise = memory.bank[npid.noise_indices(4000, 256, 0, 0, 0, "cpu")]
    opt = torch.optim.SGD(optim.param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    model.train()
    with torch.no_grad():
        z = npid.estimate_z(model(images), memory.bank[indices], noise, 0.07, 4000)
    losses = []
    for _ in range(10):
        loss = npid.nce_loss(model(images), memory.bank[indices], noise, z, 0.07, 4000)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("loss_type", ["nce", "cross_entropy"])
def test_interrupted_run_resumes_exactly(tmp_path, loss_type):
    """Memory bank, Z and the noise draws all come back: the resumed losses are bit-identical."""
    extra = ["--loss-type", loss_type]
    run_script("npid.py", *SMALL, *extra, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("npid.py", *SMALL, *extra, "--output-dir", tmp_path / "split", "--max-steps", "4")
    resumed = run_script("npid.py", *SMALL, *extra, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout and "Z =" not in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # across the epoch boundary at step 7
    assert all(math.isfinite(x) for x in full.values())
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "npid" and ckpt["step"] == 9
    assert ckpt["memory"]["bank"].shape == (120, 128)
    assert (float(ckpt["memory"]["z"]) > 0) == (loss_type == "nce")


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--data", "/no/such/dir"], "does not exist"),
        (["--memory-momentum", "1.0"], "--memory-momentum"),
        (["--batch-size", "100000"], "larger than this process's share"),
    ]
    for extra, message in cases:
        proc = run_script("npid.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    # a checkpoint whose memory bank has another size (other data) is refused
    run_script("npid.py", *SMALL, "--output-dir", tmp_path / "r", "--max-steps", "1")
    proc = run_script("npid.py", *SMALL, "--data-fraction", "0.05", "--output-dir", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "memory bank" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_two_ranks_keep_identical_memory_banks(tmp_path):
    """torchrun --nproc_per_node=2: every rank applies every rank's updates, and shares one Z."""
    run_torchrun(2, "tests/workers/dist_npid_worker.py", tmp_path, "npid", "--data", "cifar10-mini", "--data-fraction",
                 "0.03", "--arch", "resnet18", "--image-size", "32", "--batch-size", "8", "--num-negatives", "64",
                 "--workers", "0", "--max-steps", "2")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == 2
    assert torch.equal(rank0["initial"], rank1["initial"])
    assert torch.equal(rank0["bank"], rank1["bank"])
    assert float(rank0["z"]) > 0 and float(rank0["z"]) == float(rank1["z"])
    changed = (rank0["bank"] != rank0["initial"]).any(dim=1)
    assert int(changed.sum()) == 2 * 2 * 8  # 2 steps x 2 ranks x 8 distinct images, all gathered
    torch.testing.assert_close(rank0["bank"].norm(dim=1), torch.ones(len(changed)))
