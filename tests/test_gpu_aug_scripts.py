"""--gpu-aug on in every ported training script: a few steps on CPU with views made batched by
common.gpu_aug (speed.DeviceViews), finite losses, and an interrupted run that resumes to the
uninterrupted run's exact loss sequence (the per-batch generators are seeded from the epoch and
the batch's first index only). The --gpu-aug off path is covered by each tests/test_<method>.py;
simclr's --gpu-aug on resume is in tests/test_simclr.py.
"""
import math
import shutil

import pytest

from tests import (test_clusterfit, test_deepcluster_v2, test_jigsaw, test_moco, test_npid, test_pirl, test_rotnet,
                   test_swav)
from tests.conftest import metrics, run_script

# script, its tests' tiny settings plus extras, steps of the full run, steps before the interruption
CASES = {
    # 7 steps per epoch: the resumed run crosses the epoch boundary and the queue wraps around
    "moco": ("moco.py", [*test_moco.SMALL], 8, 3),
    "moco-v1": ("moco.py", [*test_moco.SMALL, "--v1"], 4, 2),  # grayscale before an always-on jitter
    # multi-crop 2x32 + 2x16; the queue (from epoch 1) fills at steps 8-9 and is used from step 10
    "swav": ("swav.py", [*test_swav.SMALL], 10, 5),
    # the initial bank pass makes its crops on the device too; k-means again before step 8
    "deepcluster_v2": ("deepcluster_v2.py", [*test_deepcluster_v2.SMALL], 9, 4),
    "npid": ("npid.py", [*test_npid.SMALL], 8, 3),
    # one random rotation per image, drawn from the step's generator, applied batched (gpu_aug.apply_rot90)
    "rotnet": ("rotnet.py", [*test_rotnet.SMALL, "--rotations", "1"], 5, 3),
    "clusterfit": ("clusterfit.py", [*test_clusterfit.SMALL], 5, 3),  # the train stage
    # Resize + RandomCrop on the device, then batched tiles (offsets and permutations from the batch's generator)
    "jigsaw": ("jigsaw.py", [*test_jigsaw.SMALL], 5, 3),
    # the image and its 9 shuffled patches in one DeviceViews call; 5 steps per epoch
    "pirl": ("pirl.py", [*test_pirl.SMALL], 6, 3),
    "pirl-gblur": ("pirl.py", [*test_pirl.SMALL, "--gblur"], 3, 1),  # VISSL's photo_gblur colour pipeline
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_aug_on_trains_and_resumes_exactly(tmp_path, case):
    script, small, steps, interrupt_at = CASES[case]
    small = [*small, "--gpu-aug", "on"]
    first = []
    if script == "clusterfit.py":  # stage 1 needs a pretrained network; the resumed run reuses its clusters
        first = ["--weights", test_clusterfit.foreign_weights(tmp_path)]
    full_run = run_script(script, *small, *first, "--output-dir", tmp_path / "full", "--max-steps", steps)
    assert "gpu-aug on" in full_run.stdout + full_run.stderr
    if script == "clusterfit.py":
        (tmp_path / "split").mkdir()
        for name in ("features.pth", "clusters.pth"):
            shutil.copy(tmp_path / "full" / name, tmp_path / "split" / name)
        first = []
    run_script(script, *small, *first, "--output-dir", tmp_path / "split", "--max-steps", interrupt_at)
    resumed = run_script(script, *small, "--output-dir", tmp_path / "split", "--max-steps", steps)
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, steps + 1))
    assert all(math.isfinite(loss) for loss in full.values())
    assert full == split  # bit-identical losses after the resume
