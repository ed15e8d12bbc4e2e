"""The fast training path shared by every script: views made on the device, channels_last, torch.compile.

Pattern (simclr.py is the reference):

    gpu_aug = speed.use_gpu_aug(args.gpu_aug, device)
    if gpu_aug:   # workers only decode; views are built batched on the device (common.gpu_aug)
        views = data.ViewDataset(data.DecodedImages(dataset, max_side=speed.max_side(crops)), None, seed=args.seed)
        make_views = speed.DeviceViews(groups, args.seed, channels_last=speed.channels_last(device))
    loader = data.build_loader(views, sampler, batch, workers, device,
                               collate_fn=data.collate_canvas if gpu_aug else data.collate)
    ...
    for batch_views, _, indices, bad in loader:
        batch_views = (make_views(batch_views, epoch, indices, device) if gpu_aug
                       else speed.to_device(batch_views, device))

Randomness of the device path: one CPU torch.Generator per batch, seeded with
data.sample_seed(seed, epoch, first index of the batch). Batches are a function of
(seed, epoch, position in the epoch) (EpochSampler), so the views of every step are
too: a run resumed mid-epoch makes exactly the same views as an uninterrupted one.
Unlike the per-image path, a sample's views also depend on its batch (its position
in it), so they change with --batch-size or the number of processes. Parameters
are drawn on the CPU (a few small tensors per batch), so a seed gives the same
views on every device.
"""
import torch

from common import data, gpu_aug


def use_gpu_aug(choice, device):
    """--gpu-aug auto|on|off -> bool; auto means on exactly when training on CUDA."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--gpu-aug must be auto, on or off, got {choice!r}.")
    return torch.device(device).type == "cuda" if choice == "auto" else choice == "on"


def channels_last(device):
    """channels_last activations and weights pay off on CUDA (cuDNN NHWC kernels); CPU keeps NCHW."""
    return torch.device(device).type == "cuda"


def max_side(crop_sizes):
    """The largest image side the decode-only workers keep: 4x the largest crop (a 0.08-area crop of an
    image this size still has about the crop's resolution); bounds the padded batch."""
    return 4 * max(crop_sizes)


def to_device(views, device, memory_format=None):
    """The per-image path's list of batches (one tensor: a list of one, the single view's batch), copied to the
    device without blocking; `memory_format` (e.g. channels_last) applies to the 4-D image batches, other tensors
    (tiles, labels) move as they are."""
    views = [views] if isinstance(views, torch.Tensor) else views
    return [v.to(device, non_blocking=True, **({"memory_format": memory_format} if memory_format is not None
                                              and v.dim() == 4 else {})) for v in views]


class DeviceViews:
    """(canvas, sizes) of uint8 images -> list of normalised float views, made on the canvas's new device.

    `groups`: [(count, ViewAugmentation), ...] in view order (e.g. 2 global crops, then small ones).
    """

    def __init__(self, groups, seed, channels_last=False):
        self.groups, self.seed = list(groups), seed
        for _, aug in self.groups:
            aug.channels_last = channels_last

    def generator(self, epoch, indices):
        return torch.Generator().manual_seed(data.sample_seed(self.seed, epoch, int(indices[0])))

    def __call__(self, batch, epoch, indices, device, generator=None):
        """`generator`: this batch's generator (self.generator(epoch, indices)) when the caller draws
        more from it afterwards (e.g. jigsaw tiles); made here otherwise."""
        canvas, sizes = batch
        if sizes is None:  # encoded JPEGs (DecodedImages(encoded=True)): decode on the device, then pad
            canvas, sizes = gpu_aug.to_canvas(data.decode_on_device(canvas, device))
        canvas = canvas.to(device, non_blocking=True)
        if len(self.groups) > 1:
            canvas = gpu_aug.to_float(canvas)  # convert once for all groups
        generator = self.generator(epoch, indices) if generator is None else generator
        views = []
        for count, aug in self.groups:
            params = aug.sample_params(sizes, count, generator, device=canvas.device)
            x = aug.apply(canvas, params)
            views += list(x.reshape(count, canvas.shape[0], *x.shape[1:]).unbind(0))
        return views


def compile_model(model, enabled):
    """torch.compile(model) when asked (the first steps are slow while it compiles); else the model."""
    return torch.compile(model) if enabled else model


def compile_in_place(modules, enabled):
    """nn.Module.compile() on each module (their state_dict keys stay unchanged): for scripts whose
    top-level forward also updates buffers or talks to other processes (MoCo's key encoder, queue)."""
    if enabled:
        for module in modules:
            module.compile()
