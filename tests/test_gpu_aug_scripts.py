"""--gpu-aug on in the colour-pipeline variants of the training scripts: a few steps on CPU with views
made batched by common.gpu_aug (speed.DeviceViews) and finite losses.

Every script's default --gpu-aug on path is trained, preempted by SIGTERM and resumed to the
uninterrupted run's exact losses and checkpoint in tests/test_reliability.py
(test_every_script_preempted_by_sigterm_resumes_exactly; simclr's in tests/test_simclr.py); the
--gpu-aug off path is resumed by each tests/test_<method>.py.
"""
import math

import pytest

from tests.helpers import MOCO_SMALL, PIRL_SMALL, metrics, run_script
from tests.test_vicreg import SMALL as VICREG_SMALL

# script, its tests' tiny settings plus the variant's flags, steps
CASES = {
    "moco-v1": ("moco.py", [*MOCO_SMALL, "--v1"], 3),  # grayscale before an always-on jitter
    "pirl-gblur": ("pirl.py", [*PIRL_SMALL, "--gblur"], 3),  # VISSL's photo_gblur colour pipeline
    "vicreg-cifar": ("vicreg.py", ["--preset", "cifar", *VICREG_SMALL], 3),  # solarisation on both views, no blur
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_aug_on_trains_the_colour_variants(tmp_path, case):
    script, small, steps = CASES[case]
    run = run_script(script, *small, "--gpu-aug", "on", "--output-dir", tmp_path, "--max-steps", steps)
    assert "gpu-aug on" in run.stdout + run.stderr
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
