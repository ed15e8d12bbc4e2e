"""Batched, per-sample-random image augmentations for SSL, on any device.

Every augmentation the SSL scripts use is split in two:

* ``sample_*_params(...)`` draws the per-sample random parameters as tensors,
  following torchvision's distributions (``RandomResizedCrop.get_params``,
  ``ColorJitter.get_params``, ``GaussianBlur.get_params``, ``RandomApply``...),
* ``apply_*(images, params)`` applies them to a whole batch at once, with no
  Python loop over samples and no per-sample ``.item()``.  Each ``apply_*``
  agrees with the corresponding ``torchvision.transforms.v2.functional`` op
  applied image by image with the same parameters (see tests/test_gpu_aug.py).

``ViewAugmentation`` composes them like a torchvision pipeline::

    RandomResizedCrop(size, scale, ratio) -> RandomHorizontalFlip(flip_p)
    -> RandomApply([ColorJitter(b, c, s, h)], jitter_p) -> RandomGrayscale(grayscale_p)
    -> RandomApply([GaussianBlur(k, sigma)], blur_p) -> RandomSolarize(thr, solarize_p)
    -> ToTensor/ToDtype(float32, scale) -> Normalize(mean, std)

and ``MultiCrop`` builds several groups of views (e.g. 2x224 + 6x96).  For the pretext-task
methods: ``resize_size`` (Resize + RandomCrop instead of RandomResizedCrop, Jigsaw),
``grayscale_first`` (MoCo v1's order), ``photometric_p`` (PIRL's posterize / sharpness /
solarize / autocontrast), ``apply_rot90`` (RotNet), ``apply_jigsaw_tiles`` (Jigsaw's tiles)
and ``JigsawPatches`` (PIRL's shuffled patches, each with its own colour draw).

Inputs: a uint8 or float batch ``[B, C, H, W]`` (floats are taken to be in
[0, 1]), or a list of ``[C, H_i, W_i]`` images of different sizes, which are
padded into one canvas; every crop box is then sampled inside its own image.
Outputs: float32 ``[B, C, size, size]``, normalised, optionally channels_last.

Conventions and the few host syncs:
* The crop is ONE ``grid_sample`` call per view group (bilinear,
  align_corners=False, no antialias).  Sampling coordinates reproduce
  ``F.resized_crop(..., antialias=False)``: source = (dst + 0.5) * in/out - 0.5
  clamped to the crop box, so pixels outside the box never contribute.  The
  horizontal flip is folded into the grid (it reverses the x coordinates).
* Colour jitter (random order per sample): for each of the 4 order positions
  the batch is permuted (one index_select) so that samples whose op there is
  brightness / contrast / saturation / hue / none are contiguous slices, and
  each op runs once on its slice.  Host syncs: one for the jitter (the slice
  lengths), one each for grayscale and blur (``nonzero`` of the samples that
  get them); never one per sample.
* Randomness comes from an optional ``torch.Generator``; parameters are drawn
  on the generator's device and moved to the images' device, so a seed gives
  the same result on every device.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
Images = Union[Tensor, Sequence[Tensor]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision ColorJitter's function ids (fn_idx = torch.randperm(4))
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

__all__ = [
    "to_canvas", "image_sizes", "to_float",
    "sample_resized_crop_params", "apply_resized_crop", "sample_resize_crop_params",
    "sample_hflip_params", "apply_hflip",
    "sample_color_jitter_params", "apply_color_jitter",
    "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue",
    "sample_grayscale_params", "apply_grayscale", "rgb_to_grayscale",
    "sample_gaussian_blur_params", "apply_gaussian_blur", "gaussian_kernel1d",
    "sample_solarize_params", "apply_solarize",
    "apply_normalize", "apply_rot90", "sample_tile_offsets", "apply_jigsaw_tiles", "sample_jigsaw_patch_boxes",
    "sample_photometric_params", "apply_photometric", "adjust_sharpness", "autocontrast",
    "ViewAugmentation", "MultiCrop",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def _rand(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> Tensor:
    """U[0, 1) drawn on the generator's device (so a seed is device-independent)."""
    src = generator.device if generator is not None else (device if device is not None else "cpu")
    if dtype == torch.float64 and torch.device(src).type == "mps":
        dtype = torch.float32
    out = torch.rand(shape, generator=generator, device=src, dtype=dtype)
    return out if device is None else out.to(device)


def _bernoulli(n: int, p: float, generator, device) -> Tensor:
    """torchvision's ``torch.rand(1) < p`` per sample (bool[n])."""
    return _rand((n,), generator, device) < p


def _bcast(v: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1]"""
    return v.reshape(-1, 1, 1, 1)


def to_canvas(images: Images) -> Tuple[Tensor, Tensor]:
    """Batch ``images`` into one tensor.

    Returns ``(canvas [B, C, H, W], sizes [B, 2])`` with ``sizes[b] = (h_b, w_b)``,
    the valid region of image ``b`` (its top-left corner).  A list of
    differently sized ``[C, h, w]`` images is zero-padded to the largest size
    (a copy per image: the only per-image step, unavoidable for a list).
    """
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        sizes = torch.tensor([H, W], dtype=torch.long, device=images.device).expand(B, 2)
        return images, sizes
    images = list(images)
    if not images:
        raise ValueError("empty image list")
    C, dtype, device = images[0].shape[0], images[0].dtype, images[0].device
    for im in images:
        if im.ndim != 3 or im.shape[0] != C or im.dtype != dtype or im.device != device:
            raise ValueError("list images must all be [C, H_i, W_i] with the same C, dtype and device")
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    canvas = images[0].new_zeros((len(images), C, H, W))
    for b, im in enumerate(images):
        canvas[b, :, : im.shape[1], : im.shape[2]].copy_(im)
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images], dtype=torch.long, device=device)
    return canvas, sizes


def image_sizes(images: Images) -> Tensor:
    """``[B, 2]`` long tensor of (height, width) per image."""
    if isinstance(images, Tensor):
        return to_canvas(images)[1]
    return torch.tensor([[im.shape[-2], im.shape[-1]] for im in images], dtype=torch.long)


def to_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floats are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"unsupported dtype {images.dtype}")
    return images.to(torch.float32)


# --------------------------------------------------------------------------- #
# RandomResizedCrop (+ horizontal flip)
# --------------------------------------------------------------------------- #

def sample_resized_crop_params(
    image_sizes: Union[Tensor, Tuple[int, int]],
    scale: Tuple[float, float] = (0.08, 1.0),
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    generator: Optional[torch.Generator] = None,
    device=None,
    batch_size: Optional[int] = None,
    num_tries: int = 10,
) -> Tensor:
    """Per-sample ``RandomResizedCrop.get_params``, vectorised.

    ``image_sizes``: ``[N, 2]`` (height, width) per sample, or one ``(H, W)``
    with ``batch_size``.  Returns long ``[N, 4]`` boxes ``(top, left, height,
    width)``.  Like torchvision: up to ``num_tries`` draws of area fraction
    ~ U(scale) and log aspect ratio ~ U(log ratio); the first draw whose
    rounded box fits is kept and its corner drawn uniformly; if none fits,
    torchvision's central-crop fallback.
    """
    if not isinstance(image_sizes, Tensor):
        if batch_size is None:
            raise ValueError("give batch_size with a single (H, W) size")
        image_sizes = torch.tensor(image_sizes, dtype=torch.long).expand(batch_size, 2)
    if device is None:
        device = image_sizes.device
    sizes = image_sizes.to(device=device, dtype=torch.long)
    N = sizes.shape[0]
    fdt = torch.float32 if torch.device(device).type == "mps" else torch.float64
    Hf, Wf = sizes[:, 0].to(fdt), sizes[:, 1].to(fdt)
    area = (Hf * Wf)[:, None]

    u = _rand((N, num_tries, 2), generator, device, fdt).to(fdt)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))  # round half to even, like Python's round
    h = torch.round(torch.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= Wf[:, None]) & (h > 0) & (h <= Hf[:, None])
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # first fitting try
    found = ok.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's central-crop fallback
    in_ratio = Wf / Hf
    rmin, rmax = min(ratio), max(ratio)
    fw = torch.where(in_ratio < rmin, Wf, torch.where(in_ratio > rmax, torch.round(Hf * rmax), Wf))
    fh = torch.where(in_ratio < rmin, torch.round(Wf / rmin), Hf)
    w = torch.where(found, w, fw).to(torch.long)
    h = torch.where(found, h, fh).to(torch.long)

    # corner: torch.randint(0, H - h + 1) when found, centre otherwise
    uc = _rand((N, 2), generator, device, fdt).to(fdt)
    H, W = sizes[:, 0], sizes[:, 1]
    top = torch.minimum(torch.floor(uc[:, 0] * (H - h + 1).to(fdt)).to(torch.long), H - h)
    left = torch.minimum(torch.floor(uc[:, 1] * (W - w + 1).to(fdt)).to(torch.long), W - w)
    top = torch.where(found, top, torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(W - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def sample_resize_crop_params(
    image_sizes: Tensor, resize_size: int, crop_size: int, generator: Optional[torch.Generator] = None, device=None
) -> Tensor:
    """``Resize(resize_size)`` then ``RandomCrop(crop_size)`` per sample, as float boxes in the input image.

    torchvision's Resize scales the shorter side to ``resize_size`` and the longer one to
    ``int(resize_size * long / short)``; RandomCrop's corner is uniform over the resized image.
    Returns float ``[N, 4]`` (top, left, height, width) in input pixels, for ``apply_resized_crop``:
    bilinear resampling of that box equals resizing (without antialias) and then cropping, exactly
    when downscaling; when upscaling the box's first and last rows and columns read no pixel outside it.
    """
    device = image_sizes.device if device is None else device
    sizes = image_sizes.to(device=device, dtype=torch.long)
    h, w = sizes[:, 0], sizes[:, 1]
    short, long = torch.minimum(h, w), torch.maximum(h, w)
    new_long = torch.div(resize_size * long, short, rounding_mode="floor")
    resized_h = torch.where(h <= w, torch.full_like(h, resize_size), new_long)
    resized_w = torch.where(h <= w, new_long, torch.full_like(w, resize_size))
    if bool((torch.minimum(resized_h, resized_w) < crop_size).any()):
        raise ValueError(f"a crop of {crop_size} px does not fit in images resized to {resize_size} px")
    u = _rand((len(sizes), 2), generator, device, torch.float64).to(torch.float64)
    top = torch.floor(u[:, 0] * (resized_h - crop_size + 1)).clamp(max=resized_h - crop_size)
    left = torch.floor(u[:, 1] * (resized_w - crop_size + 1)).clamp(max=resized_w - crop_size)
    scale_h, scale_w = h / resized_h.to(torch.float64), w / resized_w.to(torch.float64)
    return torch.stack([top * scale_h, left * scale_w, crop_size * scale_h, crop_size * scale_w], dim=1)


def _crop_axis_coords(start: Tensor, length: Tensor, out: int, canvas: int) -> Tensor:
    """Normalised grid coordinates (align_corners=False) along one axis.

    Matches ``interpolate(bilinear, align_corners=False)`` of the crop
    ``[start, start + length)`` to ``out`` pixels: src = (d + 0.5) * length /
    out - 0.5, clamped to [0, length - 1] (so no pixel outside the crop is read).
    """
    start = start.to(torch.float32)[..., None]
    length = length.to(torch.float32)[..., None]
    d = torch.arange(out, device=start.device, dtype=torch.float32) + 0.5
    src = (d * (length / out) - 0.5).clamp_(min=0.0)
    src = torch.minimum(src, length - 1.0)
    return (2.0 * (start + src) + 1.0) / canvas - 1.0


def apply_resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: Union[int, Tuple[int, int]],
    flip: Optional[Tensor] = None,
) -> Tensor:
    """Crop every box and resize it to ``size`` (bilinear, no antialias), in one
    ``grid_sample`` call.

    ``images``: ``[N, C, H, W]`` uint8 or float in [0, 1].  ``boxes``: long (or float, for
    boxes between pixels) ``[N, 4]`` (top, left, height, width), or ``[V, N, 4]`` for V views of each
    image (sampled together, without copying the images).  ``flip``: optional
    bool ``[N]`` / ``[V, N]``, horizontal flip of the output.
    Returns float32 in [0, 1], ``[N, C, h, w]`` or ``[V * N, C, h, w]`` (view-major).
    """
    if isinstance(size, int):
        size = (size, size)
    oh, ow = size
    single = boxes.ndim == 2
    if single:
        boxes = boxes[None]
        flip = None if flip is None else flip[None]
    V, N, _ = boxes.shape
    if images.shape[0] != N:
        raise ValueError(f"{images.shape[0]} images but {N} boxes per view")
    H, W = images.shape[-2:]
    boxes = boxes.to(images.device)
    gy = _crop_axis_coords(boxes[..., 0], boxes[..., 2], oh, H)  # [V, N, oh]
    gx = _crop_axis_coords(boxes[..., 1], boxes[..., 3], ow, W)  # [V, N, ow]
    if flip is not None:
        gx = torch.where(flip.to(images.device)[..., None], gx.flip(-1), gx)
    grid = torch.stack(
        [gx.permute(1, 0, 2)[:, :, None, :].expand(N, V, oh, ow),
         gy.permute(1, 0, 2)[:, :, :, None].expand(N, V, oh, ow)],
        dim=-1,
    ).reshape(N, V * oh, ow, 2)
    src = images.to(torch.float32) if images.dtype == torch.uint8 else to_float(images)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if images.dtype == torch.uint8:
        out = out.mul_(1.0 / 255.0)
    C = images.shape[1]
    out = out.reshape(N, C, V, oh, ow).permute(2, 0, 1, 3, 4).reshape(V * N, C, oh, ow)
    return out


def sample_hflip_params(batch_size: int, p: float = 0.5, generator=None, device=None) -> Tensor:
    """bool[N]: flip sample n (RandomHorizontalFlip)."""
    return _bernoulli(batch_size, p, generator, device)


def apply_hflip(images: Tensor, flip: Tensor) -> Tensor:
    """Flip the samples where ``flip`` is True (others unchanged)."""
    return torch.where(_bcast(flip.to(images.device)), images.flip(-1), images)


# --------------------------------------------------------------------------- #
# colour
# --------------------------------------------------------------------------- #

def rgb_to_grayscale(x: Tensor) -> Tensor:
    """[N, 3, H, W] -> [N, 1, H, W], torchvision's weights (1-channel: unchanged)."""
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(dim=-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3)


def _blend(x: Tensor, ref: Tensor, factor: Tensor) -> Tensor:
    """clamp(factor * x + (1 - factor) * ref, 0, 1), per-sample factor [N]."""
    f = _bcast(factor).to(x.dtype)
    return (x * f + ref * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros((), dtype=x.dtype, device=x.device), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[-3] == 1:  # like torchvision: no-op on 1-channel images
        return x
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample hue shift (factor in [-0.5, 0.5]) through HSV, float in [0, 1].

    Same maths as torchvision's ``_rgb_to_hsv`` / ``h = (h + factor) mod 1`` /
    ``_hsv_to_rgb``, written with fewer passes: with v = max, v*s = max - min
    and H6 = 6h, the output channel n (R: 5, G: 3, B: 1) is
    ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)``, k = (n + H6) mod 6,
    which is the sector table of ``_hsv_to_rgb`` in closed form (computed as
    ``min + (max - min) * clamp(|((n + 1 + H6) mod 6) - 3| - 1, 0, 1)``).
    """
    if x.shape[-3] == 1:  # like torchvision: no-op on 1-channel images
        return x
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)  # faster than aminmax over the channel dim
    minc = torch.minimum(torch.minimum(r, g), b)
    crange = maxc - minc
    # sector masks as 0/1 floats (arithmetic selection: torch.where is slow on CPU here)
    m_r = (maxc == r).to(x.dtype)
    m_g = (maxc == g).to(x.dtype).mul_(1.0 - m_r)
    m_b = (1.0 - m_r).sub_(m_g)
    # hue in sixths, before the mod: R: (g-b)/range, G: 2 + (b-r)/range, B: 4 + (r-g)/range
    num = (g - b).mul_(m_r).add_((b - r).mul_(m_g)).add_((r - g).mul_(m_b))  # exactly one term is non-zero
    h6 = num.div_(crange.clamp(min=1e-12))  # range == 0 -> num == 0 -> any hue, output = min = max
    # + sector offset (0, 2, 4), + 6 * factor, + 1 for the shift below
    off = torch.add(m_r, m_g, alpha=0.5).mul_(-4.0).add_(5.0 + 6.0 * factor.reshape(-1, 1, 1).to(x.dtype))
    h6 = h6.add_(off).unsqueeze(-3)
    # channel n (R: 5, G: 3, B: 1), k = (n + H6) mod 6, w = clamp(min(k, 4 - k), 0, 1):
    # with j = (k + 1) mod 6 - 3 = ((n + 1 + H6) mod 6) - 3, 1 - w = clamp(|j| - 1, 0, 1), so
    # out = max - range * w = min + range * clamp(|j| - 1, 0, 1)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).reshape(3, 1, 1)
    j = (h6 + n).remainder_(6.0).sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return j.mul_(crange.unsqueeze(-3)).add_(minc.unsqueeze(-3))  # in place: big fresh buffers are slow on CPU


def sample_color_jitter_params(
    batch_size: int,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 1.0,
    generator=None,
    device=None,
) -> Dict[str, Tensor]:
    """Per-sample ``RandomApply([ColorJitter(...)], p).get_params``.

    Returns ``apply`` bool[N]; ``factors`` float[N, 4] = (brightness, contrast,
    saturation, hue) with b/c/s ~ U[max(0, 1 - x), 1 + x], hue ~ U[-h, h]; and
    ``order`` long[N, 4], a uniform random permutation of
    (BRIGHTNESS, CONTRAST, SATURATION, HUE) per sample, the order in which the
    four adjustments are applied (torchvision's ``torch.randperm(4)``).
    A strength of 0 gives the identity factor (torchvision skips that op).
    """
    N = batch_size
    apply = _bernoulli(N, p, generator, device)
    u = _rand((N, 4), generator, device)
    lo = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue],
                      device=u.device)
    hi = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue], device=u.device)
    factors = lo + (hi - lo) * u
    order = torch.argsort(_rand((N, 4), generator, device), dim=1)
    return {"apply": apply, "factors": factors, "order": order}


def _inplace_jitter_op(x: Tensor, op: int, f: Tensor) -> None:
    """Apply jitter op ``op`` with per-sample factors ``f`` to ``x`` in place
    (torchvision's ``_blend``: ``x * f + ref * (1 - f)``, clamped to [0, 1])."""
    if x.shape[-3] == 1 and op in (SATURATION, HUE):  # torchvision: no-ops on 1 channel
        return
    if op == HUE:
        x.copy_(adjust_hue(x, f))
        return
    fb = _bcast(f).to(x.dtype)
    ref = None
    if op == CONTRAST:
        ref = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    elif op == SATURATION:
        ref = rgb_to_grayscale(x)
    x.mul_(fb)
    if ref is not None:
        x.add_(ref.mul_(1.0 - fb))
    x.clamp_(0.0, 1.0)


def apply_color_jitter(x: Tensor, params: Dict[str, Tensor]) -> Tensor:
    """Apply sampled jitter to float images [N, 3, H, W] in [0, 1].

    Per order position k, the batch is permuted so that the samples whose k-th
    op is brightness, contrast, saturation, hue (or nothing: jitter not
    applied) are contiguous slices; each op then runs once on its slice.  One
    host sync in all (the slice lengths), none per sample.
    """
    device = x.device
    apply = params["apply"].to(device)
    factors = params["factors"].to(device, torch.float32)
    order = params["order"].to(device)
    N = x.shape[0]
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    # op id per (sample, position); 4 = skip (jitter not applied, or identity factor:
    # torchvision skips ops whose strength is 0)
    skip = ~apply[:, None] | (factors.gather(1, order) == identity[order])
    ops = torch.where(skip, torch.full_like(order, 4), order)
    counts = torch.stack([torch.bincount(ops[:, k], minlength=5) for k in range(4)]).tolist()
    ar = torch.arange(N, device=device)
    out = spare = None  # two buffers, reused (fresh large allocations are slow on CPU)
    inv_prev = None
    for k in range(4):
        if sum(counts[k][:4]) == 0:
            continue
        perm = torch.argsort(ops[:, k], stable=True)
        if out is None:
            out = x.index_select(0, perm)
        else:
            spare = torch.empty_like(out) if spare is None else spare
            out, spare = torch.index_select(out, 0, inv_prev[perm], out=spare), out
        f = factors.index_select(0, perm)
        start = 0
        for op in range(4):
            n = counts[k][op]
            if n:
                _inplace_jitter_op(out[start:start + n], op, f[start:start + n, op])
            start += n
        inv_prev = torch.empty_like(perm)
        inv_prev[perm] = ar
    if out is None:
        return x
    return out.index_select(0, inv_prev) if spare is None else torch.index_select(out, 0, inv_prev, out=spare)


def sample_grayscale_params(batch_size: int, p: float = 0.2, generator=None, device=None) -> Tensor:
    """bool[N] (RandomGrayscale(p))."""
    return _bernoulli(batch_size, p, generator, device)


def apply_grayscale(x: Tensor, mask: Tensor, inplace: bool = False) -> Tensor:
    """Replace the masked samples by their 3-channel grayscale."""
    idx = torch.nonzero(mask.to(x.device)).squeeze(1)
    out = x if inplace else x.clone()
    if idx.numel() > 0:
        out.index_copy_(0, idx, rgb_to_grayscale(x.index_select(0, idx)).expand(-1, x.shape[1], -1, -1))
    return out


# --------------------------------------------------------------------------- #
# Gaussian blur, solarisation, normalisation
# --------------------------------------------------------------------------- #

def sample_gaussian_blur_params(
    batch_size: int, sigma: Tuple[float, float] = (0.1, 2.0), p: float = 1.0, generator=None, device=None
) -> Dict[str, Tensor]:
    """``RandomApply([GaussianBlur(k, sigma)], p)``: ``apply`` bool[N] and
    ``sigma`` float[N] ~ U[sigma_min, sigma_max]."""
    apply = _bernoulli(batch_size, p, generator, device)
    s = sigma[0] + (sigma[1] - sigma[0]) * _rand((batch_size,), generator, device)
    return {"apply": apply, "sigma": s}


def gaussian_kernel1d(kernel_size: int, sigma: Tensor) -> Tensor:
    """[N, k] normalised kernels exp(-x^2 / (2 sigma^2)), x = -(k-1)/2 .. (k-1)/2."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    return torch.softmax(-0.5 * (x[None, :] / sigma.to(torch.float32)[:, None]) ** 2, dim=1)


def apply_gaussian_blur(x: Tensor, params: Dict[str, Tensor], kernel_size: int) -> Tensor:
    """Separable blur with per-sample sigma and reflect padding (torchvision's
    ``gaussian_blur``), one grouped convolution pair over the blurred subset."""
    if kernel_size % 2 != 1 or kernel_size <= 0:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    idx = torch.nonzero(params["apply"].to(x.device)).squeeze(1)
    if idx.numel() == 0:
        return x
    sub = x.index_select(0, idx)
    M, C, H, W = sub.shape
    ker = gaussian_kernel1d(kernel_size, params["sigma"].to(x.device)[idx]).to(x.dtype)
    ker = ker.repeat_interleave(C, dim=0)  # [M*C, k]
    pad = kernel_size // 2
    y = F.pad(sub, [pad, pad, pad, pad], mode="reflect").reshape(1, M * C, H + 2 * pad, W + 2 * pad)
    y = F.conv2d(y, ker[:, None, :, None], groups=M * C)  # vertical
    y = F.conv2d(y, ker[:, None, None, :], groups=M * C)  # horizontal
    return x.index_copy(0, idx, y.reshape(M, C, H, W))


def adjust_sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Per-sample ``F.adjust_sharpness`` (float [0, 1]): blend with the 3x3 smoothing [[1,1,1],[1,5,1],[1,1,1]]/13
    in the interior, border pixels unchanged; one depthwise convolution for the batch."""
    N, C, H, W = x.shape
    if H <= 2 or W <= 2:
        return x
    kernel = torch.full((3, 3), 1.0 / 13.0, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5.0 / 13.0
    smooth = F.conv2d(x.reshape(1, N * C, H, W), kernel.expand(N * C, 1, 3, 3), groups=N * C)
    smooth = smooth.reshape(N, C, H - 2, W - 2)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(_blend(inner, smooth, factor.to(x.device)))
    return out


def autocontrast(x: Tensor) -> Tensor:
    """``F.autocontrast`` (float [0, 1]): each channel stretched to [0, 1]; constant channels unchanged."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    constant = high == low
    scale = torch.where(constant, torch.ones_like(high), high - low)
    return ((x - torch.where(constant, torch.zeros_like(low), low)) / scale).clamp_(0.0, 1.0)


def sample_photometric_params(batch_size: int, p: float = 0.66, generator=None, device=None) -> Dict[str, Tensor]:
    """VISSL's ImgPilRandomPhotometric (PIRL): with probability ``p`` all of posterize (``bits`` uniform in
    4..8), sharpness (``sharpness`` ~ U[0.1, 1.9)), solarize (``threshold`` uniform in 0..256, over 255)
    and autocontrast, else none; ``apply`` bool[N]. The integer ranges are closed, as VISSL's
    RandomPosterizeTransform and RandomSolarizeTransform draw them (closed_interval=True): 8 bits and a
    threshold of 256 leave the image as it is."""
    apply = _bernoulli(batch_size, p, generator, device)
    u = _rand((batch_size, 3), generator, device, torch.float64).to(torch.float64)
    return {"apply": apply, "bits": (4 + torch.floor(u[:, 0] * 5)).clamp(max=8).to(torch.long),
            "sharpness": (0.1 + 1.8 * u[:, 1]).to(torch.float32),
            "threshold": (torch.floor(u[:, 2] * 257).clamp(max=256) / 255.0).to(torch.float32)}


def apply_photometric(x: Tensor, params: Dict[str, Tensor]) -> Tensor:
    """posterize -> sharpness -> solarize -> autocontrast on the samples where ``apply`` (torchvision's float
    semantics: posterize is floor(x 2^bits) / 2^bits); one host sync (the subset)."""
    idx = torch.nonzero(params["apply"].to(x.device)).squeeze(1)
    if idx.numel() == 0:
        return x
    sub = x.index_select(0, idx)
    levels = _bcast(torch.pow(2.0, params["bits"].to(x.device)[idx].to(x.dtype)))
    posterized = torch.minimum(torch.floor(sub * levels), levels - 1).clamp_(min=0.0) / levels
    sub = torch.where(levels < 256, posterized, sub)  # 8 bits keep every level, as PIL's posterize
    sub = adjust_sharpness(sub, params["sharpness"].to(x.device)[idx])
    threshold = _bcast(params["threshold"].to(x.device, x.dtype)[idx])
    sub = torch.where(sub >= threshold, 1.0 - sub, sub)
    return x.index_copy(0, idx, autocontrast(sub))


def sample_solarize_params(batch_size: int, p: float = 0.2, generator=None, device=None) -> Tensor:
    """bool[N] (RandomSolarize(threshold, p))."""
    return _bernoulli(batch_size, p, generator, device)


def apply_solarize(x: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels >= threshold (float units: 128/255 for PIL's 128) of masked samples."""
    return torch.where(_bcast(mask.to(x.device)) & (x >= threshold), 1.0 - x, x)


def apply_normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False) -> Tensor:
    """(x - mean) / std per channel (torchvision's Normalize)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return x.sub_(m).div_(s) if inplace else (x - m) / s


def apply_rot90(images: Tensor, k: Tensor) -> Tensor:
    """Rotate sample b by ``k[b]`` x 90 degrees (``torch.rot90(images[b], k[b], dims=(-2, -1))``), square
    images; no per-sample loop and no host sync (the four rotations are selected per sample)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations by 90 degrees need square images, got {tuple(images.shape[-2:])}")
    k = _bcast(k.to(images.device).remainder(4))
    out = images
    for r in range(1, 4):
        out = torch.where(k == r, torch.rot90(images, r, dims=(-2, -1)), out)
    return out


def sample_tile_offsets(batch_size: int, n_tiles: int, max_offset: int, generator=None, device=None) -> Tensor:
    """long ``[N, n_tiles, 2]`` (dy, dx), each uniform in [0, max_offset] (``torch.randint(max_offset + 1, ...)``)."""
    u = _rand((batch_size, n_tiles, 2), generator, device, torch.float64).to(torch.float64)
    return torch.floor(u * (max_offset + 1)).clamp(max=max_offset).to(torch.long)


def apply_jigsaw_tiles(images: Tensor, offsets: Tensor, cell: int, tile: int, standardize: bool = True) -> Tensor:
    """The tiles of a jigsaw puzzle (Noroozi & Favaro 2016), one gather for the whole batch.

    ``images`` [N, C, S, S] with S >= grid * cell; ``offsets`` long [N, grid * grid, 2]: tile k (row-major
    cell k // grid, k % grid) is the ``tile`` x ``tile`` square at (cell row * cell + dy, cell col * cell + dx).
    ``standardize``: each tile's channels get zero mean and unit (unbiased) std, ``(t - mean) / (std + 1e-5)``.
    Returns [N, grid * grid, C, tile, tile].
    """
    n_tiles = offsets.shape[1]
    grid = math.isqrt(n_tiles)
    offsets = offsets.to(images.device)
    position = torch.arange(n_tiles, device=images.device)
    corner = torch.stack([position // grid, position % grid], dim=1) * cell + offsets  # [N, T, 2]
    steps = torch.arange(tile, device=images.device)
    rows = (corner[..., 0, None] + steps)[:, :, :, None]  # [N, T, t, 1]
    cols = (corner[..., 1, None] + steps)[:, :, None, :]  # [N, T, 1, t]
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    tiles = images[batch, :, rows, cols].permute(0, 1, 4, 2, 3)  # [N, T, t, t, C] -> [N, T, C, t, t]
    if standardize:
        mean = tiles.mean(dim=(-2, -1), keepdim=True)
        std = tiles.std(dim=(-2, -1), keepdim=True)
        tiles = (tiles - mean) / (std + 1e-5)
    return tiles.contiguous()


def sample_jigsaw_patch_boxes(
    sizes: Tensor, crop_size: int, crop_scale: Tuple[float, float], patch_size: int, grid: int = 3,
    generator=None, device=None,
) -> Tensor:
    """PIRL's jigsaw geometry per image, as float boxes ``[grid * grid, N, 4]`` in the image, in a random order.

    The per-image pipeline: ``RandomResizedCrop(crop_size, crop_scale)``, a grid x grid of cells of
    ``crop_size // grid`` px, in each a ``patch_size`` square at an offset uniform in 0 .. cell - patch_size - 1
    on each axis (VISSL's ImgPatchesFromTensor, np.random.randint(0, cell - patch_size)), patches shuffled.
    Here each patch is one box of the image (resampling it equals resizing the crop and cutting the
    patch, see ``sample_resize_crop_params``); view k of image n is the patch of cell ``order[n, k]``.
    """
    device = sizes.device if device is None else device
    crop = sample_resized_crop_params(sizes, crop_scale, generator=generator, device=device).to(torch.float64)
    cell, n_tiles, N = crop_size // grid, grid * grid, len(sizes)
    offsets = sample_tile_offsets(N, n_tiles, max(cell - patch_size - 1, 0), generator, device)
    position = torch.arange(n_tiles, device=device)
    corner = (torch.stack([position // grid, position % grid], dim=1) * cell + offsets).to(torch.float64)
    scale_h, scale_w = crop[:, 2, None] / crop_size, crop[:, 3, None] / crop_size  # image px per crop px
    boxes = torch.stack([crop[:, 0, None] + corner[..., 0] * scale_h, crop[:, 1, None] + corner[..., 1] * scale_w,
                         (patch_size * scale_h).expand(N, n_tiles), (patch_size * scale_w).expand(N, n_tiles)], -1)
    order = torch.argsort(_rand((N, n_tiles), generator, device), dim=1)  # a uniform random shuffle per image
    return boxes.gather(1, order[..., None].expand(N, n_tiles, 4)).transpose(0, 1)


# --------------------------------------------------------------------------- #
# composed pipelines
# --------------------------------------------------------------------------- #

class ViewAugmentation:
    """One random view per image, the batched twin of the torchvision pipeline

        T.RandomResizedCrop(size, scale, ratio, antialias=False)   # resize_size: T.Resize(resize_size);
        T.RandomHorizontalFlip(flip_p)                             #   T.RandomCrop(size) instead
        T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p)
        RandomPhotometric(photometric_p)         # PIRL's: posterize, sharpness, solarize, autocontrast
        T.RandomGrayscale(grayscale_p)           # grayscale_first=True: before the jitter (MoCo v1)
        T.RandomApply([T.GaussianBlur(blur_kernel_size, blur_sigma)], p=blur_p)
        T.RandomSolarize(solarize_threshold, solarize_p)
        T.ToTensor(); T.Normalize(mean, std)      # mean=None: no normalisation

    ``blur_kernel_size`` defaults to SimCLR's: the odd integer nearest 10 % of size.
    Usage: ``view = aug(images, generator)`` or ``views = aug.views(images, 2, g)``;
    or ``params = aug.sample_params(sizes, num_views, g)`` then ``aug.apply(canvas, params)``.
    """

    def __init__(
        self,
        size: int,
        scale: Tuple[float, float] = (0.08, 1.0),
        ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.0,
        blur_sigma: Tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: Optional[int] = None,
        solarize_p: float = 0.0,
        solarize_threshold: float = 0.5,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
        channels_last: bool = False,
        grayscale_first: bool = False,
        resize_size: Optional[int] = None,
        photometric_p: float = 0.0,
    ):
        self.size = size
        self.photometric_p = photometric_p
        self.grayscale_first = grayscale_first
        self.resize_size = resize_size
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), flip_p
        self.jitter = (brightness, contrast, saturation, hue)
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p
        self.blur_p, self.blur_sigma = blur_p, tuple(blur_sigma)
        if blur_kernel_size is None:
            blur_kernel_size = int(0.1 * size) // 2 * 2 + 1
        self.blur_kernel_size = blur_kernel_size
        self.solarize_p, self.solarize_threshold = solarize_p, solarize_threshold
        self.mean, self.std = mean, std
        self.channels_last = channels_last

    def sample_params(self, sizes: Tensor, num_views: int = 1, generator=None, device=None) -> Dict:
        """Parameters for ``num_views`` views of each image; ``sizes`` [B, 2]."""
        device = sizes.device if device is None else device
        B = sizes.shape[0]
        N = num_views * B
        rep = sizes.to(device).repeat(num_views, 1)
        has_color = any(v > 0 for v in self.jitter) and self.jitter_p > 0
        return {
            "boxes": (sample_resized_crop_params(rep, self.scale, self.ratio, generator, device)
                      if self.resize_size is None else
                      sample_resize_crop_params(rep, self.resize_size, self.size, generator, device)
                      ).reshape(num_views, B, 4),
            "flip": sample_hflip_params(N, self.flip_p, generator, device).reshape(num_views, B),
            "jitter": sample_color_jitter_params(N, *self.jitter, p=self.jitter_p, generator=generator,
                                                 device=device) if has_color else None,
            "gray": sample_grayscale_params(N, self.grayscale_p, generator, device) if self.grayscale_p > 0 else None,
            "blur": sample_gaussian_blur_params(N, self.blur_sigma, self.blur_p, generator, device)
            if self.blur_p > 0 else None,
            "solarize": sample_solarize_params(N, self.solarize_p, generator, device) if self.solarize_p > 0 else None,
            "photometric": sample_photometric_params(N, self.photometric_p, generator, device)
            if self.photometric_p > 0 else None,
        }

    def apply(self, canvas: Tensor, params: Dict) -> Tensor:
        """[B, C, H, W] canvas -> [V * B, C, size, size] float32 (view-major)."""
        x = apply_resized_crop(canvas, params["boxes"], self.size, params["flip"])
        if params["gray"] is not None and self.grayscale_first:
            x = apply_grayscale(x, params["gray"], inplace=True)
        if params["jitter"] is not None:
            x = apply_color_jitter(x, params["jitter"])
        if params.get("photometric") is not None:
            x = apply_photometric(x, params["photometric"])
        if params["gray"] is not None and not self.grayscale_first:
            x = apply_grayscale(x, params["gray"], inplace=True)
        if params["blur"] is not None:
            x = apply_gaussian_blur(x, params["blur"], self.blur_kernel_size)
        if params["solarize"] is not None:
            x = apply_solarize(x, params["solarize"], self.solarize_threshold)
        if self.mean is not None:
            x = apply_normalize(x, self.mean, self.std, inplace=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def views(self, images: Images, num_views: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``[num_views, B, C, size, size]``: independent views of every image."""
        canvas, sizes = to_canvas(images)
        params = self.sample_params(sizes, num_views, generator, canvas.device)
        x = self.apply(canvas, params)
        return x.reshape(num_views, canvas.shape[0], *x.shape[1:])

    def __call__(self, images: Images, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.views(images, 1, generator)[0]


class JigsawPatches(ViewAugmentation):
    """PIRL's jigsaw branch: ``grid * grid`` views per image, its shuffled patches (``sample_jigsaw_patch_boxes``),
    each through the colour pipeline of ``ViewAugmentation`` (``**kwargs``) on its own, flip included."""

    def __init__(self, patch_size: int, crop_size: int, crop_scale: Tuple[float, float], grid: int = 3, **kwargs):
        super().__init__(patch_size, scale=crop_scale, **kwargs)
        self.crop_size, self.grid = crop_size, grid

    def sample_params(self, sizes: Tensor, num_views: int = 9, generator=None, device=None) -> Dict:
        if num_views != self.grid ** 2:
            raise ValueError(f"JigsawPatches makes {self.grid ** 2} views per image, not {num_views}")
        device = sizes.device if device is None else device
        boxes = sample_jigsaw_patch_boxes(sizes, self.crop_size, self.scale, self.size, self.grid, generator, device)
        params = super().sample_params(sizes, num_views, generator, device)
        params["boxes"] = boxes
        return params


class MultiCrop:
    """Several groups of views, e.g. SwAV's 2x224 (0.14, 1) + 6x96 (0.05, 0.14)::

        MultiCrop([(2, ViewAugmentation(224, scale=(0.14, 1.0))),
                   (6, ViewAugmentation(96, scale=(0.05, 0.14)))])

    ``__call__(images, generator)`` returns the list of all views (group by
    group), each ``[B, C, size_g, size_g]``.  Each group is one batched call.
    """

    def __init__(self, groups: Sequence[Tuple[int, ViewAugmentation]]):
        self.groups = [(int(n), aug) for n, aug in groups]

    @classmethod
    def swav(cls, sizes=(224, 96), counts=(2, 6), scales=((0.14, 1.0), (0.05, 0.14)), **kw) -> "MultiCrop":
        return cls([(n, ViewAugmentation(s, scale=sc, **kw)) for s, n, sc in zip(sizes, counts, scales)])

    def __call__(self, images: Images, generator: Optional[torch.Generator] = None) -> List[Tensor]:
        canvas, sizes = to_canvas(images)
        if canvas.dtype == torch.uint8 and len(self.groups) > 1:
            canvas = to_float(canvas)  # convert once for all groups
        out: List[Tensor] = []
        for n, aug in self.groups:
            params = aug.sample_params(sizes, n, generator, canvas.device)
            x = aug.apply(canvas, params)
            out.extend(x.reshape(n, canvas.shape[0], *x.shape[1:]).unbind(0))
        return out
