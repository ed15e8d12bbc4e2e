"""A method's views, stated once: both data paths are built from the same recipe.

A training script describes its views as a list of ``(count, View)`` groups, e.g. SimCLR's::

    [(2, View(224, scale=(0.08, 1.0), interpolation="bicubic", jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8,
              grayscale_p=0.2, blur_p=0.5))]

and ``Run.loader`` builds the two paths from that one statement:

* ``PerImage(groups)``: image -> list of views, in the data workers (the CPU path, ``--gpu-aug off``).
  Each view's parameters are drawn with the batched samplers of ``common.gpu_aug`` (one image at a time,
  from the per-sample seeded torch generator of ``data.ViewDataset``) and applied to the PIL image with
  torchvision's functional ops, which are PIL's own (antialiased resampling, uint8 colour arithmetic).
* ``batched(groups, seed)``: ``speed.DeviceViews`` of ``View.batched()`` = ``gpu_aug.ViewAugmentation``,
  the same samplers and the same order of operations on a whole batch on the device (``--gpu-aug on``).

So an edit to a script's recipe changes what runs on every device; tests/test_augment.py checks, for
every script, that the two paths draw the same parameter distributions and give the same images for the
same parameters. Where they still differ, by construction: the batched crop resamples bilinearly without
antialias (the per-image crop uses ``interpolation``, with PIL's antialias), colour ops run in float rather
than in uint8 steps, and posterize follows torchvision's float rule (``floor(x 2^bits) / 2^bits``) rather
than PIL's bit mask.

Order of operations (both paths; torchvision's transforms named)::

    RandomResizedCrop(size, scale, ratio, interpolation)   # or Resize(resize_size) + RandomCrop(size)
    RandomHorizontalFlip(flip_p)                           # commutes with everything below
    RandomGrayscale(grayscale_p)                           # here only when grayscale_first (MoCo v1)
    RandomApply([ColorJitter(*jitter)], jitter_p)          # the four adjustments in a random order
    RandomPhotometric(photometric_p)                       # PIRL: posterize, sharpness, solarize, autocontrast
    RandomGrayscale(grayscale_p)
    RandomApply([GaussianBlur(blur_kernel_size, blur_sigma)], blur_p)
    RandomSolarize(solarize_threshold, solarize_p)
    ToTensor(); Normalize(mean, std)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from common import gpu_aug, speed

INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class View:
    """One view's recipe. Defaults are the identity: a script states every operation its method uses."""

    size: int                                   # output side, pixels
    scale: Tuple[float, float] = (0.08, 1.0)    # RandomResizedCrop's area fraction
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio
    resize_size: Optional[int] = None           # Resize(resize_size) + RandomCrop(size) instead
    interpolation: str = "bilinear"             # the per-image crop's resampling (the batched crop: bilinear)
    flip_p: float = 0.5
    jitter: Tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # ColorJitter(brightness, contrast, ...)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    grayscale_first: bool = False
    photometric_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: Optional[int] = None      # None: the odd integer nearest 10 % of size (SimCLR's)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    mean: Optional[Tuple[float, float, float]] = gpu_aug.IMAGENET_MEAN  # None: no normalisation
    std: Optional[Tuple[float, float, float]] = gpu_aug.IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION)}, got {self.interpolation!r}.")

    @property
    def source_side(self):
        """The image side this view is cut from at full resolution (bounds the decode-only workers' images)."""
        return self.resize_size or self.size

    @property
    def kernel_size(self):
        """The blur's kernel side (gpu_aug's rule when blur_kernel_size is None)."""
        return self.blur_kernel_size or int(0.1 * self.size) // 2 * 2 + 1

    def colour(self):
        """The keyword arguments of ``gpu_aug.ViewAugmentation`` after its size and crop."""
        brightness, contrast, saturation, hue = self.jitter
        return dict(flip_p=self.flip_p, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                    jitter_p=self.jitter_p, grayscale_p=self.grayscale_p, grayscale_first=self.grayscale_first,
                    photometric_p=self.photometric_p, blur_p=self.blur_p, blur_sigma=self.blur_sigma,
                    blur_kernel_size=self.kernel_size, solarize_p=self.solarize_p,
                    solarize_threshold=self.solarize_threshold, mean=self.mean, std=self.std)

    def batched(self):
        """The batched path: ``gpu_aug.ViewAugmentation`` with this recipe."""
        return gpu_aug.ViewAugmentation(self.size, scale=self.scale, ratio=self.ratio, resize_size=self.resize_size,
                                        **self.colour())


@dataclass(frozen=True)
class Patches(View):
    """PIRL's jigsaw branch: a RandomResizedCrop(crop_size, scale) cut into a grid x grid of cells, in each a
    ``size`` square at a uniform offset, the squares shuffled; each then gets the colour ops on its own
    (``grid * grid`` views per image, the flip included)."""

    crop_size: int = 255
    grid: int = 3

    @property
    def source_side(self):
        return self.crop_size

    def batched(self):
        return gpu_aug.JigsawPatches(self.size, self.crop_size, self.scale, self.grid, **self.colour())


def check_per_view(count, **options):
    """Refuse options that take one probability per view (e.g. blur_p=(1.0, 0.1) for two asymmetric views) when one
    of them has another number of entries."""
    if any(len(values) != count for values in options.values()):
        names = " and ".join(f"--{name.replace('_', '-')}" for name in options)
        given = " and ".join(str(tuple(values)) for values in options.values())
        words = {1: "one", 2: "two", 3: "three"}.get(count, str(count))
        raise ValueError(f"{names} take one probability per view ({words}), got {given}.")


def max_side(groups):
    """The largest image side the decode-only workers keep for these views (``speed.max_side``)."""
    return speed.max_side([view.source_side for _, view in groups])


def batched(groups, seed, channels_last=False):
    """The batched path of ``[(count, View), ...]``: decoded batch -> views, on the device."""
    return speed.DeviceViews([(count, view.batched()) for count, view in groups], seed, channels_last)


def select(groups, only):
    """One view of each listed crop (by position in the flat list of views), e.g. a memory-bank pass."""
    flat = [view for count, view in groups for _ in range(count)]
    return [(1, flat[c]) for c in only]


class PerImage:
    """The per-image path of ``[(count, View), ...]``: PIL image -> list of float views, in the data workers.

    Parameters come from the batched samplers (``View.batched().sample_params`` for one image, torch's default
    generator, which ``data.ViewDataset`` seeds per sample); ``apply`` is PIL's work, view by view.
    """

    def __init__(self, groups):
        self.groups = [(int(count), view, view.batched()) for count, view in groups]

    def sample(self, width, height):
        """Every group's parameters for one image: [(count, View, params)], params in the batched layout."""
        sizes = torch.tensor([[height, width]])
        return [(count, view, augmentation.sample_params(sizes, count)) for count, view, augmentation in self.groups]

    def __call__(self, image):
        views = []
        for count, view, params in self.sample(*image.size):
            views += [apply(view, image, params, v) for v in range(count)]
        return views


def _at(params, key, n):
    value = params.get(key)
    if value is None:
        return None
    return {k: t[n] for k, t in value.items()} if isinstance(value, dict) else value[n]


def apply(view: View, image: Image.Image, params, v: int) -> torch.Tensor:
    """View ``v`` of one PIL image with the batched layout's parameters (``ViewAugmentation.sample_params`` for
    a batch of one): a float tensor [3, size, size], normalised as the recipe says."""
    top, left, height, width = params["boxes"][v, 0].tolist()
    resample = INTERPOLATION[view.interpolation]
    if all(float(b).is_integer() for b in (top, left, height, width)):  # RandomResizedCrop: crop, then resize
        image = image.crop((int(left), int(top), int(left + width), int(top + height)))
        if image.size != (view.size, view.size):
            image = image.resize((view.size, view.size), resample)
    else:  # a box between pixels (Resize + RandomCrop, PIRL's patches): one resampling of that box
        image = image.resize((view.size, view.size), resample, box=(left, top, left + width, top + height))
    if bool(params["flip"][v, 0]):
        image = TF.hflip(image)
    gray = _at(params, "gray", v)
    if gray is not None and view.grayscale_first and bool(gray):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    jitter = _at(params, "jitter", v)
    if jitter is not None and bool(jitter["apply"]):
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in jitter["order"].tolist():
            if view.jitter[op] > 0:  # torchvision skips an adjustment of strength 0
                image = adjust[op](image, float(jitter["factors"][op]))
    photometric = _at(params, "photometric", v)
    if photometric is not None and bool(photometric["apply"]):
        image = TF.posterize(image, int(photometric["bits"]))
        image = TF.adjust_sharpness(image, float(photometric["sharpness"]))
        image = TF.solarize(image, _pil_threshold(float(photometric["threshold"])))
        image = TF.autocontrast(image)
    if gray is not None and not view.grayscale_first and bool(gray):
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    blur = _at(params, "blur", v)
    if blur is not None and bool(blur["apply"]):
        sigma, kernel = float(blur["sigma"]), view.kernel_size
        image = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])
    solarize = _at(params, "solarize", v)
    if solarize is not None and bool(solarize):
        image = TF.solarize(image, _pil_threshold(view.solarize_threshold))
    x = TF.to_tensor(image)
    return x if view.mean is None else TF.normalize(x, view.mean, view.std)


def _pil_threshold(threshold):
    """The float rule ``x >= threshold`` on uint8 pixels i/255: i >= ceil(255 threshold)."""
    return int(math.ceil(threshold * 255 - 1e-3))
