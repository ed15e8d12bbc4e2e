"""eval_suite.py: the VTAB-1k protocol over a suite of end tasks, and the work area its runners share.

The tasks are synthetic with known answers (tests/suite_data.py): CIFAR-10 classes, counting and
regression of drawn shapes, an egomotion pair, segmentation of drawn shapes and a depth map that
is a function of the image. Every metric is recomputed from the saved predictions by float64
references written from the definitions; the linear protocol is checked against eval_linear.py's
`--protocol vtab` on the same features.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eval_suite
from common import features, workarea
from tests import suite_data
from tests.helpers import ROOT, run_script, script_env

FAST = ["--workers", "0", "--epochs", "10", "--dense-epochs", "8", "--poll", "0.2", "--seeds", "2"]


def suite_run(work, *argv, check=True, **kw):
    proc = run_script("eval_suite.py", "--work-dir", work, *argv, check=check, **kw)
    return proc


def log_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return root, suite_data.write_suite(root, sizes=(64, 32, 64), image_size=32, seed=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_every_kind_against_float64_references(suite, tmp_path, device):
    root, truth = suite
    work = tmp_path / "work"
    proc = suite_run(work, "--weights", "random", "--arch", "resnet18", "--cifar-stem", "--suite", root / "suite.txt",
                     "--save-predictions", "--device", device, *FAST)
    assert all(line["state"] == "finished" for line in log_lines(proc.stdout)[:-1])
    suite_run(work, "--summary", "--output", tmp_path / "s.json")
    summary = json.loads((work / "summary.json").read_text())
    # every task's encode and sweep; two seeds of 4 kinds' fits, one of the two exact ridge fits
    assert summary["complete"] and summary["states"]["finished"] == 6 * 2 + 4 * 2 + 2
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    rows = {r["task"]: r for r in summary["tasks"]}
    for name, task in truth.items():
        kind = task["kind"]
        test = task["splits"]["test"]
        fits = sorted((work / "predictions").glob(f"fit.{name}.seed*.pth"))
        assert len(fits) == (1 if kind in ("regression", "counting") else 2)
        values = []
        for path in fits:
            pred = torch.load(path)["prediction"].double().numpy()
            result = json.loads((work / "finished" / f"{path.stem}.json").read_text())["metrics"]
            if kind in ("classification", "pairs"):
                ref = {"top1": suite_data.ref_top1(pred, [ex["label"] for ex in test])}
            elif kind == "regression":
                ref = {"mae": suite_data.ref_mae(pred, [ex["value"] for ex in test])}
            elif kind == "counting":
                counts = [ex["count"] for ex in test]
                ref = {"mae": suite_data.ref_mae(pred, counts), "count_accuracy": suite_data.ref_count_accuracy(pred,
                                                                                                              counts)}
            elif kind == "segmentation":
                masks = [ex["mask"] for ex in test]
                ref = {"miou": suite_data.ref_miou(list(pred), masks, 3),
                       "pixel_accuracy": suite_data.ref_pixel_accuracy(list(pred), masks)}
            else:
                ref = suite_data.ref_depth_metrics(pred, np.stack([ex["depth"] for ex in test]))
            assert set(ref) <= set(result), (name, result)
            for metric, value in ref.items():
                assert result[metric] == pytest.approx(value, rel=1e-5, abs=1e-5), (name, metric)
            values.append(result[eval_suite.METRIC[kind]])
        assert rows[name]["mean"] == pytest.approx(np.mean(values), abs=1e-3)
        assert rows[name]["n"] == len(values)
    assert rows["gradient_depth"]["metrics"]["delta1"] > 0


def test_ridge_is_the_float64_least_squares_solution():
    """ridge_paths against numpy's lstsq of the augmented system [x; sqrt(n lambda) I] w = [y; 0]."""
    rng = np.random.default_rng(3)
    for n, d in ((37, 5), (11, 19)):  # more rows than features, and fewer
        x, y = rng.standard_normal((n, d)) * 3 + 1, rng.standard_normal(n)
        lambdas = [1e-4, 0.3, 7.0]
        w, b = eval_suite.ridge_paths(torch.from_numpy(x), torch.from_numpy(y), lambdas)
        xc, yc = x - x.mean(0), y - y.mean()
        for lam, wi, bi in zip(lambdas, w.numpy(), b.numpy()):
            ref = np.linalg.lstsq(np.vstack([xc, np.sqrt(n * lam) * np.eye(d)]), np.concatenate([yc, np.zeros(d)]),
                                  rcond=None)[0]
            np.testing.assert_allclose(wi, ref, rtol=1e-9, atol=1e-10)
            assert bi == pytest.approx(y.mean() - x.mean(0) @ ref, abs=1e-9)


def test_vtab_protocol_is_eval_linears(tmp_path):
    """The classification fits are eval_linear.py --protocol vtab (train800 then val200 as its train set) per seed."""
    root = tmp_path / "suite"
    suite_data.write_suite(root, sizes=(800, 200, 300), tasks=["cifar_classes"])
    work = tmp_path / "work"
    suite_run(work, "--weights", "random", "--arch", "resnet18", "--suite", root / "suite.txt", "--workers", "0",
              "--epochs", "5", "--seeds", "3", "--poll", "0.2")
    splits = torch.load(work / "features" / "cifar_classes.pth")["splits"]
    feats = tmp_path / "f.pth"
    features.save_features(feats, ["pooled"],
                           ({"pooled": torch.cat([splits["train"]["features"]["pooled"],
                                                  splits["val"]["features"]["pooled"]])},
                            torch.cat([splits["train"]["targets"], splits["val"]["targets"]])),
                           ({"pooled": splits["test"]["features"]["pooled"]}, splits["test"]["targets"]),
                           {"weights": "random", "arch": "resnet18", "image_size": 32})
    linear = json.loads(run_script("eval_linear.py", "--features", feats, "--protocol", "vtab", "--vtab-order",
                                   "given", "--vtab-seeds", "3", "--epochs", "5").stdout.splitlines()[-1])
    sweep = json.loads((work / "finished" / "sweep.cifar_classes.json").read_text())
    assert (sweep["lr"], sweep["weight_decay"], sweep["val"]) == (linear["lr"], linear["weight_decay"],
                                                                   linear["val_top1"])
    ours = [json.loads((work / "finished" / f"fit.cifar_classes.seed{s}.json").read_text())["metrics"]["top1"]
            for s in range(3)]
    assert ours == pytest.approx(linear["top1_runs"], abs=1e-3)


# ---------------------------------------------------------------- runners sharing a work area
def test_two_runners_finish_every_item_exactly_once(suite, tmp_path):
    root, _ = suite
    work = tmp_path / "work"
    start = ["eval_suite.py", "--work-dir", work, "--weights", "random", "--arch", "resnet18", "--cifar-stem",
             "--suite", root / "suite.txt", *FAST]
    procs = [subprocess.Popen([sys.executable, *map(str, start)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    done = [line for out, _ in outs for line in log_lines(out) if "item" in line]
    items = [line["item"] for line in done]
    assert all(line["state"] == "finished" for line in done), done
    assert len(items) == len(set(items)) == 22  # every item done once, by one of the two runners
    assert len({line["runner"] for line in done}) == 2  # both took items
    assert sorted(p.stem for p in (work / "finished").glob("*.json")) == sorted(items)
    assert not list((work / "running").iterdir()) and not list((work / "queued").iterdir())


def start_and_stop_in_the_middle_of(item, argv, work, sig):
    """Start a runner, send it `sig` a second into `item`; returns its exit status."""
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((work / "running").glob(f"{item}@*")
                                              if (work / "running").is_dir() else []):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)  # in the middle of the decoder's training
    proc.send_signal(sig)
    proc.communicate()
    return proc.returncode


def test_a_runner_stopped_or_killed_mid_item_leaves_it_recoverable(tmp_path):
    root = tmp_path / "suite"
    suite_data.write_suite(root, tasks=["shape_count", "shape_segmentation"])
    work = tmp_path / "work"
    argv = ["eval_suite.py", "--work-dir", work, "--weights", "random", "--arch", "resnet18", "--cifar-stem",
            "--suite", root / "suite.txt", *FAST[:-2], "--seeds", "1", "--dense-epochs", "40"]
    item = "sweep.shape_segmentation"
    # SIGTERM (a preempted job): the runner puts its item back in the queue on its way out
    assert start_and_stop_in_the_middle_of(item, argv, work, signal.SIGTERM) == 143
    assert not list((work / "running").iterdir()) and (work / "queued" / item).exists()
    # SIGKILL: the claim stays behind, and the summary shows the item as running
    assert start_and_stop_in_the_middle_of(item, argv, work, signal.SIGKILL) == -signal.SIGKILL
    assert [p.name.split("@")[0] for p in (work / "running").iterdir()] == [item]
    suite_run(work, "--summary")
    summary = json.loads((work / "summary.json").read_text())
    assert not summary["complete"] and summary["states"]["running"] == 1
    # the same command again: the dead runner's claim (this machine, its process gone) is taken back at once
    rerun = suite_run(work, *argv[3:])
    redone = [line["item"] for line in log_lines(rerun.stdout) if "item" in line]
    assert redone[0] == item and len(redone) == len(set(redone))
    suite_run(work, "--summary")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["complete"] and summary["states"]["finished"] == 2 * 3


def test_a_stale_claim_of_another_machine_is_taken_again_and_a_live_one_is_not(tmp_path):
    area = workarea.WorkArea(tmp_path, heartbeat=0.2, stale_after=1.0)
    area.sync(["a", "b"])
    other = tmp_path / "running" / "a@othermachine.123.abcd"
    os.rename(tmp_path / "queued" / "a", other)  # held by a runner elsewhere
    assert area.recover_stale() == []  # its heartbeat is fresh
    past = area.now() - 5
    os.utime(other, (past, past))
    assert area.recover_stale() == ["a"] and (tmp_path / "queued" / "a").exists()
    # a live runner's claim survives while its work outlasts the stale limit: the heartbeat keeps it fresh
    assert area.claim("b")
    seen = []
    thief = workarea.WorkArea(tmp_path, heartbeat=0.2, stale_after=1.0)
    state, _ = area.run_item("b", lambda: [seen.append(thief.recover_stale()) or time.sleep(0.3)
                                           for _ in range(8)] and {"ok": 1})
    assert state == "finished" and seen == [[]] * 8
    # a result is published once, even if a runner thought dead finishes later
    assert area.claim("a")
    assert area.run_item("a", lambda: {"v": 1})[0] == "finished"
    (tmp_path / "queued" / "a").touch()
    assert thief.claim("a") and thief.run_item("a", lambda: {"v": 2})[0] == "duplicate"
    assert area.result("a")["v"] == 1


def test_a_crashed_item_is_reported_and_run_again_by_rerunning(tmp_path):
    root = tmp_path / "suite"
    truth = suite_data.write_suite(root, sizes=(16, 8, 8), tasks=["gradient_depth"])
    broken = root / "gradient_depth" / truth["gradient_depth"]["splits"]["test"][0]["depth_path"]
    good = broken.read_bytes()
    broken.write_bytes(b"\x93NUMPY garbage")
    work = tmp_path / "work"
    argv = ["--weights", "random", "--arch", "resnet18", "--suite", root / "suite.txt", *FAST[:-2], "--seeds", "1"]
    proc = suite_run(work, *argv, check=False)
    assert proc.returncode == 1
    assert log_lines(proc.stdout)[0]["state"] == "crashed" and "is not a readable .npy array" in proc.stdout
    out = suite_run(work, "--summary").stdout
    assert "crashed: encode.gradient_depth" in out and "1 crashed" in out and "2 waiting" in out
    broken.write_bytes(good)
    suite_run(work, *argv)
    suite_run(work, "--summary")
    assert json.loads((work / "summary.json").read_text())["complete"]


# ---------------------------------------------------------------- bad input: one sentence, nothing written
@pytest.mark.parametrize("line,message", [
    ("t classification", "expected 'name kind folder [key=value ...]'"),
    ("t colour t", "unknown kind 'colour'; choose from classification"),
    ("t classification nowhere", "task t's folder"),
    ("t classification t bogus=1", "unknown option 'bogus=1'"),
    ("t classification t image_size=big", "image_size= needs a number, got 'big'."),
    ("t/x classification t", "a task name is letters, digits"),
    ("t classification t\nt classification t", "task 't' is listed twice."),
    ("t classification t train=none", "task t has no train split: neither"),
    ("t counting t", "t/train800.txt:2: the count must be an integer in [0, 10^6), got '2.5'."),
    ("t pairs t", "a pairs line is path_a path_b label"),
    ("t classification t", "task t: 2 of the 2 files its train800 split lists do not exist, e.g. "),
])
def test_bad_suites_are_one_sentence(tmp_path, line, message):
    task = tmp_path / "t"
    task.mkdir()
    (task / "train800.txt").write_text("a.png 1\nb.png 2.5\n" if "counting" in line else "a.png 1\nb.png 2\n")
    for split in ("val200", "test"):
        (task / f"{split}.txt").write_text("a.png 1\n")
    (tmp_path / "s.txt").write_text(f"# a suite\n{line}\n")
    work = tmp_path / "work"
    proc = suite_run(work, "--weights", "random", "--suite", tmp_path / "s.txt", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not work.exists()


def test_bad_work_dirs_are_one_sentence(suite, tmp_path):
    root, _ = suite
    for argv, message in [((), "holds no evaluation: start one with --weights and --suite."),
                          (("--summary",), "holds no evaluation"),
                          (("--weights", "random", "--suite", "vtab1k"), "--suite vtab1k lists task folders by name"),
                          (("--weights", "random", "--suite", "nosuch"), "suite nosuch does not exist"),
                          (("--weights", "/no/ckpt.pth", "--suite", root / "suite.txt"),
                           "/no/ckpt.pth does not exist")]:
        proc = suite_run(tmp_path / "work", *argv, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "work").exists()
    work = tmp_path / "other"
    suite_run(work, "--weights", "random", "--arch", "resnet18", "--suite", root / "suite.txt", "--summary")
    proc = suite_run(work, "--weights", "random", "--arch", "resnet50", "--suite", root / "suite.txt", check=False)
    assert proc.returncode == 2 and "holds another evaluation" in proc.stderr


# ---------------------------------------------------------------- VTAB-1k's list and converted data
def test_the_vtab1k_list_names_19_tasks_in_three_groups(tmp_path):
    for line in (ROOT / "suites" / "vtab1k.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (tmp_path / line.split()[2]).mkdir()
    tasks = eval_suite.read_suite("vtab1k", str(tmp_path))
    assert len(tasks) == 19 and {t["kind"] for t in tasks} == {"classification"}
    groups = [t["group"] for t in tasks]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert all(t["resize"] == "squash" and (t["train"], t["val"]) == ("train800", "val200") for t in tasks)


def test_a_converted_tfds_dataset_runs_as_a_vtab_task(tmp_path):
    """scripts/vtab_from_tfds.py's folder, listed with suites/vtab1k.txt's line, is a task eval_suite.py runs."""
    from tests.test_vtab_from_tfds import convert, make_cifar

    make_cifar(tmp_path / "tfds")
    assert convert(tmp_path, "--tasks", "cifar100", "--split-sizes", "8,2").returncode == 0
    line = next(x for x in (ROOT / "suites" / "vtab1k.txt").read_text().splitlines() if x.startswith("cifar100 "))
    (tmp_path / "out" / "suite.txt").write_text(line + "\n")
    work = tmp_path / "work"
    suite_run(work, "--weights", "random", "--arch", "resnet18", "--image-size", "32", "--suite",
              tmp_path / "out" / "suite.txt", "--workers", "0", "--epochs", "2", "--seeds", "1", "--poll", "0.2")
    encoded = json.loads((work / "finished" / "encode.cifar100.json").read_text())
    assert (encoded["n_train"], encoded["n_val"], encoded["n_test"], encoded["image_size"]) == (8, 2, 5, 32)
    suite_run(work, "--summary")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["complete"] and summary["tasks"][0]["mean"] == 0.0  # TFDS test labels 50-54: never in train


# ---------------------------------------------------------------- dense tasks on every family of trunk
@pytest.mark.parametrize("arch,size,shapes", [
    ("resnet18", 64, [(128, 8, 8), (256, 4, 4), (512, 2, 2)]),
    ("regnet_x_400mf", 64, [(64, 8, 8), (160, 4, 4), (400, 2, 2)]),
    ("convnext_tiny", 64, [(192, 8, 8), (384, 4, 4), (768, 2, 2)]),
    ("vit_ti_16", 48, [(192, 3, 3)] * 3),
])
def test_feature_maps_of_every_family(arch, size, shapes):
    from common import models

    torch.manual_seed(0)
    trunk = models.build_trunk(arch).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = models.feature_maps(trunk, images)
        assert [tuple(m.shape[1:]) for m in maps] == shapes and all(len(m) == 2 for m in maps)
        if arch == "vit_ti_16":  # the last map is the last block's patch tokens, as the ViT's taps see them
            last = trunk.last_blocks(images, 1)[0][:, 1:]
            torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), last, rtol=0, atol=0)
        else:  # the deepest map pooled is the trunk's pooled feature
            pooled = models.features(trunk, images, ("pooled",))["pooled"]
            if arch != "convnext_tiny":  # ConvNeXt's pooled feature has its LayerNorm after the pooling
                torch.testing.assert_close(maps[-1].mean((2, 3)), pooled, rtol=1e-6, atol=1e-6)


def test_a_vit_trunk_runs_the_dense_tasks(tmp_path):
    root = tmp_path / "suite"
    suite_data.write_suite(root, sizes=(16, 8, 8), tasks=["shape_segmentation", "gradient_depth"])
    work = tmp_path / "work"
    suite_run(work, "--weights", "random", "--arch", "vit_ti_16", "--suite", root / "suite.txt", *FAST[:-2],
              "--seeds", "1", "--dense-epochs", "2")
    suite_run(work, "--summary")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["complete"] and all(r["mean"] is not None for r in summary["tasks"])
