"""common/gpu_aug.py against torchvision, image by image, with the same parameters.

Tolerances (float images in [0, 1]):
* ATOL = 1e-4 for every single op (crop, flip, jitter ops, grayscale, blur,
  solarize): the batched ops do the same arithmetic as torchvision up to float32
  rounding (grid coordinates normalised for grid_sample, hue in closed form,
  separable blur vs torchvision's 2-D kernel), which stays around 1e-6.
  This is well inside 1/255 (one step of an 8-bit image), the error the batched
  path may have against torchvision at most.
* The composed pipeline (crop, flip, jitter in random order, grayscale, blur,
  solarize) is held to the same 1e-4 before normalisation (observed ~1e-5).
Distribution checks use fixed seeds and p-value thresholds of 1e-3, with a
negative control showing the same check rejects a slightly wrong distribution.
"""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from scipy import stats
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import gpu_aug as A  # noqa: E402

ATOL = 1e-4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_images(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=gen(seed))


def tv_resized_crop(img, box, size):
    t, l, h, w = [int(v) for v in box]
    return TF.resized_crop(img, t, l, h, w, [size, size], interpolation=InterpolationMode.BILINEAR,
                           antialias=False)


# --------------------------------------------------------------------------- #
# RandomResizedCrop + flip
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("size", [24, 64])  # mostly downsampling / mostly upsampling
def test_resized_crop_matches_torchvision(size):
    x = rand_images(16, 37, 53)
    boxes = A.sample_resized_crop_params(A.image_sizes(x), generator=gen(1))
    # edge cases: whole image, 1-pixel strips, boxes touching the right/bottom border
    boxes[:4] = torch.tensor([[0, 0, 37, 53], [36, 52, 1, 1], [0, 10, 37, 1], [20, 40, 17, 13]])
    flip = A.sample_hflip_params(16, 0.5, gen(2))
    out = A.apply_resized_crop(x, boxes, size, flip)
    assert out.shape == (16, 3, size, size) and out.dtype == torch.float32
    for i in range(16):
        ref = tv_resized_crop(x[i], boxes[i], size)
        if flip[i]:
            ref = TF.horizontal_flip(ref)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_resized_crop_multi_view_equals_single_views_and_uint8():
    u8 = (rand_images(6, 30, 41, seed=3) * 255).round().to(torch.uint8)
    sizes = A.image_sizes(u8)
    boxes = A.sample_resized_crop_params(sizes.repeat(3, 1), generator=gen(4)).reshape(3, 6, 4)
    flip = A.sample_hflip_params(18, 0.5, gen(5)).reshape(3, 6)
    out = A.apply_resized_crop(u8, boxes, 20, flip)  # [3*6, ...], view-major
    for v in range(3):
        single = A.apply_resized_crop(u8.float() / 255, boxes[v], 20, flip[v])
        torch.testing.assert_close(out[v * 6:(v + 1) * 6], single, atol=1e-6, rtol=0)


def test_variable_size_list_input():
    shapes = [(40, 60), (64, 33), (25, 25), (50, 71)]
    imgs = [(torch.rand(3, h, w, generator=gen(i)) * 255).to(torch.uint8) for i, (h, w) in enumerate(shapes)]
    canvas, sizes = A.to_canvas(imgs)
    assert canvas.shape == (4, 3, 64, 71)
    assert sizes.tolist() == [list(s) for s in shapes]
    # boxes always inside their own image's region
    many = A.sample_resized_crop_params(sizes.repeat(2000, 1), scale=(0.02, 1.0), generator=gen(6))
    hw = sizes.repeat(2000, 1)
    t, l, h, w = many.unbind(1)
    assert (t >= 0).all() and (l >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (t + h <= hw[:, 0]).all() and (l + w <= hw[:, 1]).all()
    # resampling the padded canvas == torchvision on each original (unpadded) image
    boxes = A.sample_resized_crop_params(sizes, generator=gen(7))
    boxes[0] = torch.tensor([0, 0, 40, 60])  # a whole image, touching its padding
    out = A.apply_resized_crop(canvas, boxes, 32)
    for i, im in enumerate(imgs):
        ref = tv_resized_crop(im.float() / 255, boxes[i], 32)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    # the composed pipeline accepts the list too
    views = A.ViewAugmentation(32, blur_p=0.5).views(imgs, 2, gen(8))
    assert views.shape == (2, 4, 3, 32, 32) and torch.isfinite(views).all()


def _tv_boxes(h, w, n, scale, ratio, seed):
    torch.manual_seed(seed)
    img = torch.empty(1, h, w)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


@pytest.mark.parametrize("hw,scale", [((60, 90), (0.08, 1.0)), ((20, 200), (0.08, 1.0)), ((96, 96), (0.05, 0.14))])
def test_resized_crop_params_distribution(hw, scale):
    n = 20000
    ratio = (3 / 4, 4 / 3)
    ours = A.sample_resized_crop_params(hw, scale, ratio, generator=gen(10), batch_size=n).numpy()
    ref = _tv_boxes(*hw, n, scale, ratio, seed=11)
    names = ["top", "left", "height", "width"]
    for k in range(4):
        p = stats.ks_2samp(ours[:, k], ref[:, k]).pvalue
        assert p > 1e-3, (names[k], p)
    p = stats.ks_2samp(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]).pvalue
    assert p > 1e-3, ("area", p)
    # the fallback fraction (all 10 tries fail) agrees too: central full-height crops
    H, W = hw
    fb_ours = np.mean((ours[:, 2] == H) & (ours[:, 1] == (W - ours[:, 3]) // 2))
    fb_ref = np.mean((ref[:, 2] == H) & (ref[:, 1] == (W - ref[:, 3]) // 2))
    assert abs(fb_ours - fb_ref) < 4 * math.sqrt(max(fb_ref, 1e-4) / n) + 1e-3


def test_resized_crop_params_distribution_check_has_power():
    """Negative control: the KS check above rejects a slightly different scale range."""
    n = 20000
    ours = A.sample_resized_crop_params((60, 90), (0.12, 1.0), generator=gen(12), batch_size=n).numpy()
    ref = _tv_boxes(60, 90, n, (0.08, 1.0), (3 / 4, 4 / 3), seed=13)
    assert stats.ks_2samp(ours[:, 2] * ours[:, 3], ref[:, 2] * ref[:, 3]).pvalue < 1e-3


@pytest.mark.parametrize("hw", [(30, 200), (200, 30), (50, 60), (1, 7)])
def test_resized_crop_fallback_matches_torchvision(hw):
    # scale > 1: no try can fit, so torchvision's deterministic central-crop fallback is used
    scale, ratio = (2.0, 3.0), (3 / 4, 4 / 3)
    ours = A.sample_resized_crop_params(hw, scale, ratio, generator=gen(0), batch_size=5)
    ref = T.RandomResizedCrop.get_params(torch.empty(1, *hw), list(scale), list(ratio))
    assert ours.tolist() == [list(ref)] * 5


# --------------------------------------------------------------------------- #
# colour
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_single_jitter_ops_match_torchvision(name):
    x = rand_images(12, 21, 19, seed=20)
    x[0] = x[0, :1]  # a gray image (max == min everywhere)
    x[1, :, :5] = 0.0  # black and saturated regions
    x[1, :, 5:9] = 1.0
    u = torch.rand(12, generator=gen(21))
    f = u - 0.5 if name == "hue" else 2.0 * u
    ours = getattr(A, "adjust_" + name)(x, f)
    for i in range(12):
        ref = getattr(TF, "adjust_" + name)(x[i], float(f[i]))
        torch.testing.assert_close(ours[i], ref, atol=ATOL, rtol=0)


def tv_jitter(img, params, i):
    if not params["apply"][i]:
        return img
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for op in params["order"][i].tolist():
        img = fns[op](img, float(params["factors"][i, op]))
    return img


def test_color_jitter_matches_torchvision_random_order():
    x = rand_images(48, 16, 20, seed=22)
    params = A.sample_color_jitter_params(48, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=gen(23))
    assert not params["apply"].all() and params["apply"].any()
    out = A.apply_color_jitter(x, params)
    assert torch.equal(out[~params["apply"]], x[~params["apply"]])
    for i in range(48):
        torch.testing.assert_close(out[i], tv_jitter(x[i], params, i), atol=ATOL, rtol=0)


def test_color_jitter_params_distribution():
    n = 20000
    b, c, s, h, p = 0.8, 1.5, 0.4, 0.1, 0.8
    params = A.sample_color_jitter_params(n, b, c, s, h, p=p, generator=gen(24))
    f = params["factors"].double().numpy()
    bounds = [(0.2, 1.8), (0.0, 2.5), (0.6, 1.4), (-0.1, 0.1)]
    for k, (lo, hi) in enumerate(bounds):
        assert f[:, k].min() >= lo and f[:, k].max() <= hi
        assert stats.kstest(f[:, k], "uniform", args=(lo, hi - lo)).pvalue > 1e-3, k
    # apply ~ Bernoulli(p)
    rate = params["apply"].double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    # order: each row a permutation of 0..3, the 24 permutations uniform
    order = params["order"]
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0].numpy()
    assert len(counts) == 24
    assert stats.chisquare(counts).pvalue > 1e-3
    # the same check rejects a non-uniform order (negative control)
    biased = codes.clone()
    biased[: n // 50] = codes[0]
    bc = torch.bincount(biased, minlength=256)
    assert stats.chisquare(bc[bc > 0].numpy()).pvalue < 1e-3


def test_grayscale_solarize_normalize_flip_match_torchvision():
    x = rand_images(10, 17, 23, seed=30)
    g = A.sample_grayscale_params(10, 0.5, gen(31))
    s = A.sample_solarize_params(10, 0.5, gen(32))
    fl = A.sample_hflip_params(10, 0.5, gen(33))
    assert g.any() and (~g).any() and s.any() and (~s).any() and fl.any() and (~fl).any()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    og, os_, on, of = (A.apply_grayscale(x, g), A.apply_solarize(x, s, 0.5),
                       A.apply_normalize(x, mean, std), A.apply_hflip(x, fl))
    for i in range(10):
        torch.testing.assert_close(og[i], TF.rgb_to_grayscale(x[i], 3) if g[i] else x[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(os_[i], TF.solarize(x[i], 0.5) if s[i] else x[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(on[i], TF.normalize(x[i], list(mean), list(std)), atol=ATOL, rtol=0)
        torch.testing.assert_close(of[i], TF.horizontal_flip(x[i]) if fl[i] else x[i], atol=0, rtol=0)


@pytest.mark.parametrize("k", [3, 9, 23])
def test_gaussian_blur_matches_torchvision(k):
    x = rand_images(8, 30, 26, seed=40)
    params = A.sample_gaussian_blur_params(8, (0.1, 2.0), p=0.7, generator=gen(41))
    params["sigma"][0] = 5.0  # a wide one too
    params["apply"][0] = True
    out = A.apply_gaussian_blur(x, params, k)
    for i in range(8):
        ref = TF.gaussian_blur(x[i], [k, k], [float(params["sigma"][i])]) if params["apply"][i] else x[i]
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_gaussian_blur_params_distribution():
    n = 20000
    params = A.sample_gaussian_blur_params(n, (0.1, 2.0), p=0.5, generator=gen(42))
    s = params["sigma"].double().numpy()
    assert s.min() >= 0.1 and s.max() <= 2.0
    assert stats.kstest(s, "uniform", args=(0.1, 1.9)).pvalue > 1e-3
    assert abs(params["apply"].double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------- #
# composed pipelines
# --------------------------------------------------------------------------- #

def tv_view(img, aug, params, i):
    """torchvision functional pipeline for sample i, same order as ViewAugmentation."""
    v, b = divmod(i, params["boxes"].shape[1])
    out = tv_resized_crop(img, params["boxes"][v, b], aug.size)
    if params["flip"][v, b]:
        out = TF.horizontal_flip(out)
    gray_first = getattr(aug, "grayscale_first", False)
    if gray_first and params["gray"][i]:
        out = TF.rgb_to_grayscale(out, out.shape[-3])
    out = tv_jitter(out, params["jitter"], i)
    if not gray_first and params["gray"][i]:
        out = TF.rgb_to_grayscale(out, out.shape[-3])
    if params["blur"] is not None and params["blur"]["apply"][i]:
        k = aug.blur_kernel_size
        out = TF.gaussian_blur(out, [k, k], [float(params["blur"]["sigma"][i])])
    if params["solarize"] is not None and params["solarize"][i]:
        out = TF.solarize(out, aug.solarize_threshold)
    return out


def test_view_augmentation_matches_torchvision_pipeline():
    aug = A.ViewAugmentation(28, scale=(0.2, 1.0), jitter_p=0.8, grayscale_p=0.3, blur_p=0.5,
                             solarize_p=0.3, mean=None)
    x = rand_images(10, 40, 36, seed=50)
    params = aug.sample_params(A.image_sizes(x), num_views=2, generator=gen(51))
    out = aug.apply(x, params)
    assert out.shape == (20, 3, 28, 28)
    for i in range(20):
        ref = tv_view(x[i % 10], aug, params, i)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    # with normalisation: the same up to the affine map
    norm = A.ViewAugmentation(28, scale=(0.2, 1.0), grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    outn = norm.apply(x, params)
    ref = TF.normalize(out, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    torch.testing.assert_close(outn, ref, atol=1e-5, rtol=0)


def test_grayscale_before_jitter_matches_torchvision_pipeline():
    """MoCo v1's order: RandomGrayscale, then ColorJitter (the hue of a gray image is not a no-op in the
    other order, so the two orders give different images)."""
    aug = A.ViewAugmentation(20, jitter_p=1.0, hue=0.4, grayscale_p=0.5, mean=None, grayscale_first=True)
    x = rand_images(10, 30, 26, seed=57)
    params = aug.sample_params(A.image_sizes(x), generator=gen(58))
    assert params["gray"].any() and not params["gray"].all()
    out = aug.apply(x, params)
    for i in range(10):
        torch.testing.assert_close(out[i], tv_view(x[i], aug, params, i), atol=ATOL, rtol=0)
    later = A.ViewAugmentation(20, jitter_p=1.0, hue=0.4, grayscale_p=0.5, mean=None).apply(x, params)
    assert (later - out).abs().max() > 0.05


def test_rot90_per_sample_equals_torch_rot90_per_image():
    x = rand_images(9, 12, 12, seed=59)
    k = torch.tensor([0, 1, 2, 3, 5, -1, 2, 0, 3])  # any integer, taken mod 4 like torch.rot90
    out = A.apply_rot90(x, k)
    for b in range(9):
        assert torch.equal(out[b], torch.rot90(x[b], int(k[b]), dims=(1, 2)))
    u8 = (x * 255).to(torch.uint8)
    assert torch.equal(A.apply_rot90(u8, k), (out * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="square"):
        A.apply_rot90(rand_images(2, 12, 10), torch.tensor([1, 2]))


def test_one_channel_images_match_torchvision():
    """Fashion-MNIST-like input: saturation/hue are no-ops, grayscale keeps 1 channel."""
    aug = A.ViewAugmentation(20, grayscale_p=0.5, blur_p=0.5, solarize_p=0.3, mean=None)
    x = torch.rand(12, 1, 28, 28, generator=gen(55))
    params = aug.sample_params(A.image_sizes(x), generator=gen(56))
    assert params["jitter"]["apply"].any()
    out = aug.apply(x, params)
    assert out.shape == (12, 1, 20, 20)
    for i in range(12):
        torch.testing.assert_close(out[i], tv_view(x[i], aug, params, i), atol=ATOL, rtol=0)


def test_uint8_and_float_inputs_agree():
    u8 = (rand_images(8, 33, 45, seed=60) * 255).round().to(torch.uint8)
    aug = A.ViewAugmentation(24, blur_p=0.5, solarize_p=0.2)
    a = aug.views(u8, 2, gen(61))
    b = aug.views(u8.float() / 255, 2, gen(61))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_generator_seed_is_deterministic():
    x = (rand_images(8, 32, 32, seed=70) * 255).to(torch.uint8)
    aug = A.ViewAugmentation(32, blur_p=0.5, solarize_p=0.2)
    a, b, c = aug(x, gen(5)), aug(x, gen(5)), aug(x, gen(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    mc = A.MultiCrop.swav(sizes=(32, 16), counts=(2, 3))
    assert all(torch.equal(p, q) for p, q in zip(mc(x, gen(7)), mc(x, gen(7))))


def test_multicrop_shapes_and_independent_views():
    imgs = [(torch.rand(3, h, w, generator=gen(h)) * 255).to(torch.uint8) for h, w in [(40, 56), (48, 40), (60, 60)]]
    mc = A.MultiCrop([(2, A.ViewAugmentation(32, scale=(0.14, 1.0))),
                      (6, A.ViewAugmentation(16, scale=(0.05, 0.14), channels_last=True))])
    views = mc(imgs, gen(80))
    assert len(views) == 8
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 6
    assert views[2].is_contiguous(memory_format=torch.channels_last)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    for a in range(8):
        for b in range(a + 1, 8):
            if views[a].shape == views[b].shape:
                assert not torch.allclose(views[a], views[b])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Same CPU generator -> same parameters -> same views on CUDA as on CPU."""
    imgs = [(torch.rand(3, h, w, generator=gen(h)) * 255).to(torch.uint8) for h, w in [(40, 56), (48, 40), (60, 60)]]
    mc = A.MultiCrop([(2, A.ViewAugmentation(32, blur_p=0.5, solarize_p=0.2)),
                      (3, A.ViewAugmentation(16, scale=(0.05, 0.14)))])
    cpu = mc(imgs, gen(90))
    cuda = mc([im.cuda() for im in imgs], gen(90))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=ATOL / min(A.IMAGENET_STD), rtol=0)


# --------------------------------------------------------------------------- #
# Resize + RandomCrop (Jigsaw's image), jigsaw tiles
# --------------------------------------------------------------------------- #

def test_resize_then_random_crop_matches_torchvision_when_downscaling():
    """Resize(40) + RandomCrop(30) of 60x80 and 90x50 images as one float box each, resampled in one call."""
    x, sizes = A.to_canvas([*rand_images(6, 60, 80, seed=70), *rand_images(6, 90, 50, seed=71)])
    boxes = A.sample_resize_crop_params(sizes, 40, 30, gen(72))
    out = A.apply_resized_crop(x, boxes, 30)
    for i in range(12):
        h, w = sizes[i].tolist()
        resized = TF.resize(x[i, :, :h, :w], [40], interpolation=InterpolationMode.BILINEAR, antialias=False)
        scale_h, scale_w = h / resized.shape[-2], w / resized.shape[-1]
        top, left = round(float(boxes[i, 0]) / scale_h), round(float(boxes[i, 1]) / scale_w)
        assert abs(float(boxes[i, 2]) - 30 * scale_h) < 1e-9 and abs(float(boxes[i, 3]) - 30 * scale_w) < 1e-9
        torch.testing.assert_close(out[i], TF.crop(resized, top, left, 30, 30), atol=ATOL, rtol=0)
    # an image already at the resize size: integer boxes, exactly RandomCrop
    same = A.sample_resize_crop_params(torch.tensor([[32, 32]] * 4), 32, 30, gen(73))
    assert torch.equal(same[:, 2:], torch.full((4, 2), 30.0)) and torch.equal(same[:, :2], same[:, :2].round())


def test_resize_then_random_crop_corner_distribution():
    """The corner of the crop in the resized image is uniform over its range, as RandomCrop.get_params."""
    n = 20000
    boxes = A.sample_resize_crop_params(torch.tensor([[48, 96]]).expand(n, 2), 32, 30, gen(74))
    scale = 48 / 32  # 48x96 -> 32x64
    top, left = (boxes[:, 0] / scale).round().long(), (boxes[:, 1] / scale).round().long()
    assert top.min() == 0 and top.max() == 2 and left.min() == 0 and left.max() == 34
    torch.manual_seed(75)
    ref = np.array([T.RandomCrop.get_params(torch.empty(1, 32, 64), (30, 30)) for _ in range(n)])
    assert stats.ks_2samp(top.numpy(), ref[:, 0]).pvalue > 1e-3
    assert stats.ks_2samp(left.numpy(), ref[:, 1]).pvalue > 1e-3


def per_image_tiles(image, offsets, cell, tile):
    """A jigsaw puzzle's tiles (jigsaw.puzzles), one image at a time in a Python loop, as the per-image Puzzle
    transform used to cut them: the tile at its offset inside each cell, standardised on its own."""
    tiles = []
    for position, (dy, dx) in enumerate(offsets.tolist()):
        y, x = (position // 3) * cell + dy, (position % 3) * cell + dx
        t = image[:, y:y + tile, x:x + tile]
        tiles.append((t - t.mean(dim=(1, 2), keepdim=True)) / (t.std(dim=(1, 2), keepdim=True) + 1e-5))
    return torch.stack(tiles)


def test_jigsaw_tiles_match_the_per_image_reference():
    x = rand_images(5, 31, 31, seed=76)
    offsets = A.sample_tile_offsets(5, 9, 10 - 7, gen(77))
    assert offsets.shape == (5, 9, 2) and offsets.min() == 0 and offsets.max() == 3
    out = A.apply_jigsaw_tiles(x, offsets, cell=10, tile=7)
    assert out.shape == (5, 9, 3, 7, 7)
    for b in range(5):
        torch.testing.assert_close(out[b], per_image_tiles(x[b], offsets[b], 10, 7), atol=1e-5, rtol=0)
    raw = A.apply_jigsaw_tiles(x, offsets, cell=10, tile=7, standardize=False)
    assert torch.equal(raw[2, 4], x[2, :, 10 + int(offsets[2, 4, 0]):17 + int(offsets[2, 4, 0]),
                                     10 + int(offsets[2, 4, 1]):17 + int(offsets[2, 4, 1])])
    # uniform offsets: every value in [0, max] about equally often
    counts = torch.bincount(A.sample_tile_offsets(4000, 9, 3, gen(78)).flatten(), minlength=4).double()
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3


# --------------------------------------------------------------------------- #
# PIRL: photometric ops, jigsaw patches
# --------------------------------------------------------------------------- #

def test_photometric_matches_torchvision_per_image():
    x = rand_images(12, 20, 18, seed=80)
    x[3, 1] = 0.25  # a constant channel: autocontrast leaves it
    params = A.sample_photometric_params(12, 0.66, gen(81))
    params["apply"][:4] = True
    params["threshold"][0] = 256 / 255  # PIL's largest threshold: nothing inverted
    params["bits"][1] = 8  # nothing posterized
    out = A.apply_photometric(x, params)
    for i in range(12):
        ref = x[i]
        if params["apply"][i]:
            if int(params["bits"][i]) < 8:  # 8 bits: PIL keeps the image (torchvision's float rule would not)
                ref = TF.posterize(ref, int(params["bits"][i]))
            ref = TF.adjust_sharpness(ref, float(params["sharpness"][i]))
            if params["threshold"][i] <= 1:
                ref = TF.solarize(ref, float(params["threshold"][i]))
            ref = TF.autocontrast(ref)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)
    assert not torch.equal(out[:4], x[:4]) and torch.equal(out[~params["apply"]], x[~params["apply"]])


def test_photometric_params_distribution():
    params = A.sample_photometric_params(30000, 0.66, gen(82))
    assert abs(params["apply"].double().mean() - 0.66) < 0.015
    assert torch.equal(torch.unique(params["bits"]), torch.arange(4, 9))  # VISSL's np.random.randint(4, 8 + 1)
    assert stats.chisquare(torch.bincount(params["bits"])[4:].numpy()).pvalue > 1e-3
    thresholds = (params["threshold"] * 255).round().long()
    assert thresholds.min() == 0 and thresholds.max() == 256  # np.random.randint(0, 256 + 1)
    assert stats.chisquare(torch.bincount(thresholds, minlength=257).numpy()).pvalue > 1e-3
    assert stats.kstest(params["sharpness"].numpy(), stats.uniform(0.1, 1.8).cdf).pvalue > 1e-3


def test_jigsaw_patch_boxes_equal_cutting_the_resized_crop():
    """PIRL's patches: RandomResizedCrop(48) of a 64x80 image, 3x3 cells of 16 px, 14 px patches, shuffled."""
    sizes = torch.tensor([[64, 80]] * 6)
    boxes = A.sample_jigsaw_patch_boxes(sizes, 48, (0.6, 1.0), 14, generator=gen(83))
    assert boxes.shape == (9, 6, 4)
    crops = A.sample_resized_crop_params(sizes, (0.6, 1.0), generator=gen(83)).double()  # its first draws
    x = rand_images(6, 64, 80, seed=84)
    patches = A.apply_resized_crop(x, boxes, 14).reshape(9, 6, 3, 14, 14)
    for n in range(6):
        top, left, h, w = crops[n].tolist()
        # every patch lies inside its crop and inside one cell; the 9 cells are a permutation of the grid
        rows = ((boxes[:, n, 0] - top) / (h / 48)).round().long()
        cols = ((boxes[:, n, 1] - left) / (w / 48)).round().long()
        assert set((rows // 16 * 3 + cols // 16).tolist()) == set(range(9))
        # the offset in a cell is 0 .. cell - patch - 1 = 0 .. 1 (VISSL's np.random.randint(0, cell - patch))
        assert ((rows % 16) <= 1).all() and ((cols % 16) <= 1).all()
        # and each is the patch cut from the crop resized to 48 px (downscaling: bilinear resampling agrees)
        resized = TF.resize(TF.crop(x[n], int(top), int(left), int(h), int(w)), [48, 48],
                            interpolation=InterpolationMode.BILINEAR, antialias=False)
        for k in range(9):
            ref = TF.crop(resized, int(rows[k]), int(cols[k]), 14, 14)
            torch.testing.assert_close(patches[k, n], ref, atol=ATOL, rtol=0)


def test_jigsaw_patches_view_pipeline_shapes_and_independent_colour():
    aug = A.JigsawPatches(14, 48, (0.6, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, jitter_p=1.0,
                          photometric_p=0.66, grayscale_p=0.2)
    x = rand_images(4, 64, 64, seed=85)
    params = aug.sample_params(A.image_sizes(x), 9, gen(86))
    assert params["jitter"]["factors"].shape == (36, 4) and params["photometric"]["apply"].shape == (36,)
    out = aug.apply(x, params)
    assert out.shape == (36, 3, 14, 14) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="9 views"):
        aug.sample_params(A.image_sizes(x), 2, gen(86))
