"""One augmentation recipe per method: each script's `view_recipe(args)` builds both data paths
(common/augment.py), and for every script the two paths

* draw the same parameter distributions: the per-image path (`augment.PerImage`, one image at a time in
  the data workers) against the batched path (`View.batched().sample_params`, a whole batch on the
  device), compared statistic by statistic with two-sample Kolmogorov-Smirnov tests on a non-square image;
* give the same images for the same parameters: the same drawn parameters applied by PIL to one image
  and by the batched ops to a batch of it. With the crop box the whole image at the view's own size
  (no resampling) everything after the crop is compared, up to PIL's uint8 arithmetic; with the drawn
  boxes on a smooth image the crop and flip geometry is compared, up to the documented difference in
  resampling (PIL antialiased and `interpolation`, the batched path bilinear without antialias).

The single ops are checked against torchvision in tests/test_gpu_aug.py; this file checks each script's
recipe, so an edit to it reaches both paths. Distribution checks use fixed seeds and p > 1e-3.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import barlow_twins
import byol
import clusterfit
import deepcluster_v2
import dino
import jigsaw
import moco
import mocov3
import npid
import pirl
import rotnet
import simclr
import simsiam
import swav
import vicreg
from common import augment, cli

# name: (module, command line); the default recipes and the variants whose colour pipeline differs
CASES = {
    "simclr": (simclr, []),
    "simclr-multicrop-blur": (simclr, ["--crops", "2x64,3x24", "--blur-p", "0.5"]),
    "moco-v2": (moco, []),
    "moco-v1": (moco, ["--v1"]),
    "swav": (swav, []),
    "deepcluster_v2": (deepcluster_v2, []),
    "npid": (npid, []),
    "npid-cifar": (npid, ["--preset", "cifar"]),
    "pirl": (pirl, []),
    "pirl-gblur": (pirl, ["--gblur"]),
    "rotnet": (rotnet, []),
    "jigsaw": (jigsaw, []),
    "clusterfit": (clusterfit, []),
    "barlow_twins": (barlow_twins, []),  # BYOL's asymmetric pair: blur 1.0 / 0.1, solarisation 0 / 0.2
    "vicreg": (vicreg, []),
    "vicreg-cifar": (vicreg, ["--preset", "cifar"]),  # crop 0.2-1, no blur, solarisation 0.1 on both views
    "byol": (byol, []),  # bicubic crops, blur 1.0 / 0.1, solarisation 0 / 0.2
    "simsiam": (simsiam, []),
    "mocov3": (mocov3, []),  # BYOL's pair with bilinear crops
    "dino": (dino, []),  # 2 global crops (blur 1.0 / 0.1, solarisation on the second) and 10 local ones
}


def recipe(case):
    module, argv = CASES[case]
    args = cli.parse_args(module.Args, module.PRESETS, list(argv))
    if module is moco:
        args = moco.resolve_version_defaults(args)
    return module.view_recipe(args)


def test_every_training_script_states_its_views_once():
    """Every training script has `view_recipe` and none keeps a second, hand-kept pipeline."""
    for module in (simclr, moco, swav, deepcluster_v2, npid, pirl, rotnet, jigsaw, clusterfit, barlow_twins, vicreg,
                   byol, simsiam, mocov3, dino):
        groups = module.view_recipe(cli.parse_args(module.Args, module.PRESETS, []))
        assert groups and all(count >= 1 and isinstance(view, augment.View) for count, view in groups)
        for gone in ("device_views", "view_transform", "image_transform", "MultiView", "MultiCrop", "TwoViews"):
            assert not hasattr(module, gone), f"{module.__name__}.{gone}"


def smooth_image(width, height, seed):
    """A low-frequency RGB image (a few sinusoids per channel) as uint8 PIL: resampling it is nearly
    interpolation-independent, so the crop geometry can be compared across resamplers."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        c = np.full((height, width), 0.5)
        for _ in range(3):
            fy, fx = g.uniform(0.3, 1.5, 2)
            c += 0.12 * np.sin(2 * math.pi * (fy * y / height + fx * x / width) + g.uniform(0, 2 * math.pi))
        channels.append(c)
    return Image.fromarray(np.clip(np.stack(channels, -1) * 255, 0, 255).round().astype(np.uint8))


def textured_image(side, seed):
    """A random RGB image with structure at every scale (colour ops see saturated and dark pixels too)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse[None], size=(side, side), mode="bilinear", align_corners=False)[0]
    x = (0.7 * x + 0.3 * torch.rand(3, side, side, generator=g)).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def canvas(image):
    """PIL -> uint8 [1, 3, H, W], the batched path's input."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]


def statistics(params, sizes):
    """Per-view statistics of a parameter draw in the batched layout: name -> 1-D float array."""
    boxes = params["boxes"].reshape(-1, 4).double()
    height, width = sizes[:, 0].double(), sizes[:, 1].double()
    repeat = boxes.shape[0] // len(sizes)
    height, width = height.repeat(repeat), width.repeat(repeat)
    out = {"area": boxes[:, 2] * boxes[:, 3] / (height * width), "log_aspect": torch.log(boxes[:, 3] / boxes[:, 2]),
           "top": boxes[:, 0] / height, "left": boxes[:, 1] / width, "flip": params["flip"].reshape(-1)}
    if params["jitter"] is not None:
        out["jitter_apply"] = params["jitter"]["apply"]
        for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
            out[name] = params["jitter"]["factors"][:, k]
            out[f"{name}_position"] = (params["jitter"]["order"] == k).double().argmax(1)
    if params["gray"] is not None:
        out["gray"] = params["gray"]
    if params["blur"] is not None:
        out["blur_apply"], out["blur_sigma"] = params["blur"]["apply"], params["blur"]["sigma"]
    if params["solarize"] is not None:
        out["solarize"] = params["solarize"]
    if params.get("photometric") is not None:
        for name in ("apply", "bits", "sharpness", "threshold"):
            out[f"photometric_{name}"] = params["photometric"][name]
    return {name: value.double().numpy() for name, value in out.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_the_two_paths_draw_the_same_parameter_distributions(case):
    groups = recipe(case)
    width, height = 331, 257  # non-square: a swapped height and width shows in the crop statistics
    n_images = 1500 if sum(count for count, _ in groups) <= 4 else 600
    per_image = augment.PerImage(groups)
    torch.manual_seed(0)
    draws = [per_image.sample(width, height) for _ in range(n_images)]
    sizes = torch.tensor([[height, width]] * n_images)
    generator = torch.Generator().manual_seed(1)
    for g, (count, view) in enumerate(groups):
        one = [statistics(draw[g][2], sizes[:1]) for draw in draws]
        mine = {name: np.concatenate([s[name] for s in one]) for name in one[0]}
        batched = statistics(view.batched().sample_params(sizes, count, generator), sizes)
        if isinstance(view, augment.Patches):  # an image's 9 patches share its crop: one patch per image, so
            mine = {k: v[::count] for k, v in mine.items()}  # that the samples are independent
            batched = {k: v.reshape(count, n_images)[0] for k, v in batched.items()}
        assert mine.keys() == batched.keys()
        for name in mine:
            assert len(mine[name]) == len(batched[name])
            if np.ptp(batched[name]) == 0:
                assert np.ptp(mine[name]) == 0 and mine[name][0] == batched[name][0], (case, g, name)
                continue
            p = stats.ks_2samp(mine[name], batched[name]).pvalue
            assert p > 1e-3, f"{case} group {g}: {name} differs between the paths (KS p = {p:.2g})"


def unnormalise(x, view):
    if view.mean is None:
        return x
    mean = torch.tensor(view.mean).reshape(-1, 1, 1)
    std = torch.tensor(view.std).reshape(-1, 1, 1)
    return x * std + mean


@pytest.mark.parametrize("case", list(CASES))
def test_the_two_paths_give_the_same_images_for_the_same_parameters(case):
    """Everything after the crop: the crop box is the whole image at the view's size (no resampling on either
    path), the colour parameters are drawn; PIL computes in uint8 steps (each op rounds), the batched path in
    float (and PIL's contrast and saturation blend with integer means), so pixels agree to a few levels of 255
(measured: means of 1.2-2.3 levels). The largest differences come from PIL's hue shift in 8-bit HSV,
amplified by a saturation or contrast factor after it: up to 27 levels on 2.5 % of the pixels of a view. Posterize is left
    out: PIL masks bits of uint8 values, the batched path follows torchvision's float rule (common/augment.py)."""
    groups = recipe(case)
    generator = torch.Generator().manual_seed(2)
    matched, mismatched = [], []
    for g, (count, view) in enumerate(groups):
        image = textured_image(view.size, seed=3 + g)
        sizes = torch.tensor([[view.size, view.size]])
        for draw in range(8):
            params, other = (view.batched().sample_params(sizes, count, generator) for _ in range(2))
            for p in (params, other):
                p["boxes"] = torch.tensor([0, 0, view.size, view.size]).expand(count, 1, 4).clone()
                if p.get("photometric") is not None:
                    p["photometric"]["apply"][:] = False
            batched, batched_other = (view.batched().apply(canvas(image), p) for p in (params, other))
            for v in range(count):
                mine = unnormalise(augment.apply(view, image, params, v), view)
                difference = (mine - unnormalise(batched[v], view)).abs()
                assert difference.mean() < 3.0 / 255, (case, g, draw, v, float(difference.mean()) * 255)
                far = (difference > 12.0 / 255).double().mean()  # PIL's hue error, amplified by a later factor
                assert far < 0.05, (case, g, draw, v, float(far))
                matched.append(difference.mean())
                mismatched.append((mine - unnormalise(batched_other[v], view)).abs().mean())
    # the comparison can tell: views of another parameter draw differ several times more
    assert torch.stack(mismatched).mean() > 4 * torch.stack(matched).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_the_two_paths_crop_and_flip_the_same_boxes(case):
    """The drawn crop boxes and flips, colour ops off: PIL's resampling (antialiased, the recipe's
    interpolation) and the batched bilinear one of the same box of a smooth image agree closely; a box
    read transposed, shifted or unflipped would not."""
    groups = recipe(case)
    image = smooth_image(97, 71, seed=4)
    generator = torch.Generator().manual_seed(5)
    differences, flipped = [], []
    for g, (count, view) in enumerate(groups):
        plain = augment.View(view.size, scale=view.scale, ratio=view.ratio, resize_size=view.resize_size,
                             interpolation=view.interpolation, mean=None, std=None)
        if isinstance(view, augment.Patches):
            plain = augment.Patches(view.size, scale=view.scale, crop_size=view.crop_size, grid=view.grid,
                                    interpolation=view.interpolation, mean=None, std=None)
        sizes = torch.tensor([[image.height, image.width]])
        for draw in range(10):
            params = plain.batched().sample_params(sizes, count, generator)
            batched = plain.batched().apply(canvas(image), params)
            for v in range(count):
                mine = augment.apply(plain, image, params, v)
                difference = (mine - batched[v]).abs().mean()
                assert difference < 3.0 / 255, (case, g, draw, v, float(difference) * 255)
                differences.append(difference)
                flipped.append((torch.flip(mine, dims=(-1,)) - batched[v]).abs().mean())
    # the comparison can tell: the same views mirrored differ several times more than the two paths
    assert torch.stack(flipped).mean() > 4 * torch.stack(differences).mean()
