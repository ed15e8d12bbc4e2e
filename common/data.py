"""Datasets and loaders shared by every script.

`build_dataset(spec, split)` understands:
  - `cifar10-mini`: 4,000 train / 1,000 test CIFAR-10 JPEGs shipped in common/assets
    (class-balanced; scripts/make_cifar10_mini.py made it), so demos run anywhere;
  - `cifar10-test`: CIFAR-10's whole test split (10,000 JPEGs, also shipped; made by
    scripts/make_cifar10_test.py), the evaluation set of the demo, the convergence tests and
    bench/convergence.py; it has no training split;
  - `cifar10`, `cifar100`: a local copy under $SSL_DATA_DIR (torchvision's
    `cifar-10-batches-py`, or an ImageFolder with train/ and test/), else torchvision's
    download into $SSL_DATA_DIR (default ~/.cache/ssl-data);
  - `fashion-mnist`: the IDX files of Debian's dataset-fashion-mnist
    (/usr/share/datasets/fashion-mnist, or $FASHION_MNIST_DIR), as RGB images;
  - a directory: an ImageFolder (`<dir>/<class>/<image>`); if it has a `train/` (and
    `test/` or `val/`) sub-directory, the split's one is used;
  - a text file: one `path [label]` per line, paths relative to the file's folder, or
    `path l_1 ... l_C` with l in {1, 0, -1} for multi-label targets (present, absent,
    difficult; VOC07's N x C convention), whose labels are then C-vectors.
`build_split("SPEC@SPLIT", default)` declares the split explicitly (`cifar10@train`,
`/data/voc@val`); without `@` the script's default split is used.
Every dataset yields `(PIL RGB image, label)`; unreadable images raise `BadImage`.

`ViewDataset` wraps one of them for training: it applies a transform with a random
state derived from (seed, epoch, index) only, so augmentations do not depend on the
number of workers or on where a run was resumed; it replaces unreadable images by
another sample and reports them, so the loader survives corrupt or truncated files.
"""
import gzip
import io
import os
import random
import signal
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = ("cifar10", "cifar10-mini", "cifar10-test", "cifar100", "fashion-mnist")


class DataError(ValueError):
    """A dataset that cannot be used; the message is one sentence for the user."""


class BadImage(Exception):
    """An image that could not be decoded; carries its path or index."""


def _open_rgb(source, name):
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt, truncated or foreign files
        raise BadImage(f"{name}: {type(e).__name__}: {e}") from None


class ImageFiles(torch.utils.data.Dataset):
    """Images on disk with integer labels: the base of ImageFolder and file lists."""

    def __init__(self, paths, labels, classes):
        self.paths, self.labels, self.classes = [str(p) for p in paths], list(labels), list(classes)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return _open_rgb(self.paths[index], self.paths[index]), self.labels[index]

    def describe(self, index):
        return self.paths[index]


class EncodedImages(torch.utils.data.Dataset):
    """Images held in memory as encoded bytes (one array + offsets), e.g. cifar10-mini."""

    def __init__(self, blob, offsets, labels, classes, name):
        self.blob, self.offsets, self.labels, self.classes, self.name = blob, offsets, labels, list(classes), name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        raw = self.blob[self.offsets[index]:self.offsets[index + 1]].tobytes()
        return _open_rgb(io.BytesIO(raw), self.describe(index)), int(self.labels[index])

    def describe(self, index):
        return f"{self.name}[{index}]"


class ArrayImages(torch.utils.data.Dataset):
    """Images held as a uint8 array [N, H, W] or [N, H, W, 3] (Fashion-MNIST, CIFAR batches)."""

    def __init__(self, images, labels, classes, name):
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])

    def describe(self, index):
        return f"{self.name}[{index}]"


def _cifar10_mini(split):
    arrays = np.load(ASSETS / "cifar10_mini.npz")
    return EncodedImages(arrays[f"{split}_bytes"], arrays[f"{split}_offsets"], arrays[f"{split}_labels"],
                         arrays["classes"].tolist(), f"cifar10-mini/{split}")


def _cifar10_test(split):
    if split == "train":
        raise DataError("cifar10-test holds only CIFAR-10's 10,000 test images: use it as test data "
                        "(e.g. --test-data cifar10-test) and train on cifar10-mini, cifar10 or your own images.")
    parts = [np.load(ASSETS / f"cifar10_test_{part}.npz") for part in (0, 1)]  # two files of 5,000 images
    blob = np.concatenate([p["test_bytes"] for p in parts])
    offsets = np.concatenate([parts[0]["test_offsets"], parts[1]["test_offsets"][1:] + len(parts[0]["test_bytes"])])
    return EncodedImages(blob, offsets, np.concatenate([p["test_labels"] for p in parts]),
                         parts[0]["classes"].tolist(), "cifar10-test")


def _data_dir():
    return Path(os.environ.get("SSL_DATA_DIR", Path.home() / ".cache" / "ssl-data"))


def _cifar(name, split):
    root = _data_dir()
    folder = root / name
    if (folder / split).is_dir():  # an ImageFolder copy, e.g. SSL_DATA_DIR=/datasets with /datasets/cifar10/{train,test}
        return _image_folder(folder / split)
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tv = cls(str(root), train=(split == "train"), download=True)
    except Exception as e:
        raise DataError(f"{name} is neither under {root} nor downloadable ({type(e).__name__}: {e}); "
                        f"set SSL_DATA_DIR or pass an ImageFolder path to --data.") from None
    return ArrayImages(tv.data, tv.targets, tv.classes, f"{name}/{split}")


def _read_idx(path):
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as f:
        _, _, dtype_code, ndim = f.read(4)
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        assert dtype_code == 0x08, f"{path}: only uint8 IDX files are supported"
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _fashion_mnist(split):
    root = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    prefix = "train" if split == "train" else "t10k"
    images = sorted(root.glob(f"{prefix}-images-idx3-ubyte*"))
    labels = sorted(root.glob(f"{prefix}-labels-idx1-ubyte*"))
    if not images or not labels:
        raise DataError(f"Fashion-MNIST IDX files are not in {root}; install Debian's dataset-fashion-mnist "
                        f"(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR.")
    return ArrayImages(_read_idx(images[0]), _read_idx(labels[0]).astype(np.int64), FASHION_CLASSES,
                       f"fashion-mnist/{split}")


def _image_folder(root):
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-directories (expected <dir>/<class>/<image>).")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return ImageFiles(paths, labels, classes)


def _file_list(path):
    """A file list: one image a line, `path`, `path label` (a class id >= 0, or -1 for none) or `path` and C
    labels in {1, 0, -1}; blank lines and `#` comments are skipped. Anything else is refused with one sentence."""
    path = Path(path)
    max_classes = 10**6  # a bound on class ids, so that a stray large number is refused instead of filling memory
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file list ('path [label...]' lines).") from None
    paths, labels = [], []
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if "\x00" in line or not all(f.isascii() and f.removeprefix("-").isdigit() for f in fields[1:]) or (
                len(fields) > 2 and not all(f in ("1", "0", "-1") for f in fields[1:])) or (
                len(fields) == 2 and not (len(fields[1]) <= 8 and -1 <= int(fields[1]) < max_classes)):
            raise DataError(f"{path}:{line_no}: expected 'path [label]' with a class id in [0, {max_classes}) "
                            f"(-1: none) or 'path' and C labels in {{1, 0, -1}}, got {line[:200]!r}.")
        paths.append(fields[0] if os.path.isabs(fields[0]) else str(path.parent / fields[0]))
        labels.append([int(f) for f in fields[1:]] if len(fields) > 2 else int(fields[1]) if len(fields) == 2 else -1)
    if not paths:
        raise DataError(f"{path} lists no images.")
    if isinstance(labels[0], list) or any(isinstance(y, list) for y in labels):
        widths = {len(y) if isinstance(y, list) else 1 for y in labels}
        if len(widths) != 1:
            raise DataError(f"{path}: multi-label lines must all have the same number of labels, found {sorted(widths)}.")
        return ImageFiles(paths, labels, [str(c) for c in range(widths.pop())])
    n_classes = max(labels) + 1
    return ImageFiles(paths, labels, [str(c) for c in range(max(n_classes, 0))])


def build_dataset(spec, split="train"):
    """A dataset of (PIL RGB image, label) from a built-in name, a directory or a file list."""
    if spec is None or spec == "":
        raise DataError("--data is required (a directory, a file list, or one of " + ", ".join(BUILTIN) + ").")
    if split not in ("train", "test", "val"):
        raise DataError(f"unknown split {split!r}.")
    if spec == "cifar10-mini":
        return _cifar10_mini("test" if split == "val" else split)
    if spec == "cifar10-test":
        return _cifar10_test(split)
    if spec in ("cifar10", "cifar100"):
        return _cifar(spec, "test" if split == "val" else split)
    if spec == "fashion-mnist":
        return _fashion_mnist(split)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path {spec} does not exist (nor is it one of {', '.join(BUILTIN)}).")
    if path.is_file():
        return _file_list(path)
    for candidate in ([split] + (["val"] if split == "test" else ["test"] if split == "val" else [])):
        if (path / candidate).is_dir() and (path / "train").is_dir():
            return _image_folder(path / candidate)
    return _image_folder(path)


def build_split(spec, default_split="train"):
    """build_dataset for `SPEC` or `SPEC@SPLIT` (an explicitly declared train/val/test split)."""
    if spec and "@" in spec and spec.rsplit("@", 1)[1] in ("train", "val", "test"):
        spec, split = spec.rsplit("@", 1)
        return build_dataset(spec, split)
    return build_dataset(spec, default_split)


def fraction_indices(labels, fraction, seed=0):
    """A deterministic, class-balanced subset: `fraction` of each class, chosen by `seed`."""
    if not 0 < fraction <= 1:
        raise DataError(f"--data-fraction must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(keep))


def labels_of(dataset):
    if isinstance(dataset, torch.utils.data.Subset):
        return [labels_of(dataset.dataset)[i] for i in dataset.indices]
    return list(dataset.labels)


def subset(dataset, fraction, seed=0):
    if fraction == 1:
        return dataset
    return torch.utils.data.Subset(dataset, fraction_indices(labels_of(dataset), fraction, seed).tolist())


def _describe(dataset, index):
    if isinstance(dataset, torch.utils.data.Subset):
        return _describe(dataset.dataset, dataset.indices[index])
    return dataset.describe(index) if hasattr(dataset, "describe") else f"sample {index}"


def sample_seed(seed, epoch, index):
    """A 63-bit seed for one sample's augmentation, from (run seed, epoch, index) only."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2**63 - 1)


class ViewDataset(torch.utils.data.Dataset):
    """Applies `transform(image) -> views` with a per-sample random state; survives bad images.

    `transform=None` returns the image itself (e.g. a `DecodedImages` uint8 tensor).

    Indexed by (epoch, index) pairs from `EpochSampler`. Returns (views, label, index,
    bad), where `bad` lists the images that failed to decode and were replaced by the
    next readable sample (VISSL's idea of substituting within the same rank's data).
    """

    def __init__(self, dataset, transform, seed=0, max_replacements=50):
        self.dataset, self.transform, self.seed, self.max_replacements = dataset, transform, seed, max_replacements

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        bad = []
        for attempt in range(self.max_replacements):
            i = (index + attempt * 7_919) % len(self.dataset)
            try:
                image, label = self.dataset[i]
                break
            except BadImage as e:
                bad.append(str(e) if str(e) else _describe(self.dataset, i))
        else:
            raise DataError(f"{self.max_replacements} consecutive images failed to decode near index {index}; "
                            f"the data looks broken ({bad[-1]}).")
        if self.transform is None:  # decode-only datasets: the views are made later, batched on the device
            return image, label, index, bad
        # seed the CPU generators the transforms draw from (torch.default_generator directly:
        # torch.manual_seed also reseeds CUDA and costs ~60x more); restore them in the main
        # process, where they belong to the training loop
        seed = sample_seed(self.seed, epoch, index)
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (torch.default_generator.get_state(), random.getstate())
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        try:
            views = self.transform(image)
        finally:
            if saved is not None:
                torch.default_generator.set_state(saved[0])
                random.setstate(saved[1])
        return views, label, index, bad


def collate(samples):
    """Batches ViewDataset samples: (list of view batches, labels, indices, bad image names)."""
    views, labels, indices, bad = zip(*samples)
    if isinstance(views[0], (list, tuple)):
        batched = [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]
    else:
        batched = torch.stack(views)
    return batched, torch.tensor(labels), torch.tensor(indices), [b for group in bad for b in group]


# ----------------------------------------------------------------------------- decode-only path

def _decode_uint8(raw, name):
    """Encoded bytes -> uint8 RGB [3, H, W]: torchvision.io (libjpeg/libpng) first, PIL for other formats."""
    import torchvision.io as tio

    try:
        return tio.decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=tio.ImageReadMode.RGB)
    except Exception:  # a format torchvision.io does not read, or a broken file: PIL decides
        return torch.from_numpy(np.array(_open_rgb(io.BytesIO(raw), name))).permute(2, 0, 1).contiguous()


class DecodedImages(torch.utils.data.Dataset):
    """Decode only, for augmentation on the device: yields (uint8 RGB tensor [3, H, W], label).

    Wraps any `build_dataset` / `subset` result; sizes may differ (see `collate_canvas`).
    `max_side`: images whose longer side exceeds it are first shrunk (antialiased) to it,
    so one huge image does not blow up a padded batch; None keeps every image as stored.
    Unreadable images raise `BadImage`, as the PIL datasets do.
    `encoded=True`: JPEG files are not decoded here but returned as their bytes (uint8
    [n]), for `decode_on_device` (nvJPEG on CUDA); such images are neither checked nor
    shrunk, so use it for trusted data only (other formats are decoded as usual).
    """

    def __init__(self, dataset, max_side=None, encoded=False):
        self.dataset, self.max_side, self.encoded = dataset, max_side, encoded
        self.labels = labels_of(dataset)

    def _raw(self, raw, name):
        if self.encoded and raw[:2] == b"\xff\xd8":
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return _decode_uint8(raw, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        base, i = self.dataset, index
        while isinstance(base, torch.utils.data.Subset):
            base, i = base.dataset, base.indices[i]
        if isinstance(base, EncodedImages):
            image = self._raw(base.blob[base.offsets[i]:base.offsets[i + 1]].tobytes(), base.describe(i))
        elif isinstance(base, ImageFiles):
            try:
                with open(base.paths[i], "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise BadImage(f"{base.paths[i]}: {type(e).__name__}: {e}") from None
            image = self._raw(raw, base.paths[i])
        elif isinstance(base, ArrayImages):
            array = torch.from_numpy(np.ascontiguousarray(base.images[i]))
            image = array.expand(3, *array.shape) if array.ndim == 2 else array.permute(2, 0, 1)
            image = image.contiguous()
        else:
            pil, _ = base[i]
            image = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
        if self.max_side and image.ndim == 3 and max(image.shape[-2:]) > self.max_side:
            import torchvision.transforms.v2.functional as TF

            h, w = image.shape[-2:]
            scale = self.max_side / max(h, w)
            image = TF.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
        return image, int(self.labels[index])

    def describe(self, index):
        return _describe(self.dataset, index)


def collate_canvas(samples):
    """Batches ViewDataset samples of uint8 images: ((canvas [B, 3, H, W], sizes [B, 2]), labels, indices, bad).

    Images of different sizes are zero-padded into one canvas (top-left aligned; `sizes`
    holds each one's height and width), so a batch is one pinned tensor and one copy to
    the device; common.gpu_aug samples every crop inside its own image. With encoded
    JPEGs among them (`DecodedImages(encoded=True)`) the batch is (list of tensors, None).
    """
    images, labels, indices, bad = zip(*samples)
    if any(image.ndim == 1 for image in images):
        return (list(images), None), torch.tensor(labels), torch.tensor(indices), [b for group in bad for b in group]
    sizes = torch.tensor([image.shape[-2:] for image in images], dtype=torch.long)
    if bool((sizes == sizes[0]).all()):
        canvas = torch.stack(images)
    else:
        height, width = sizes.max(0).values.tolist()
        canvas = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for slot, image in zip(canvas, images):
            slot[:, :image.shape[1], :image.shape[2]] = image
    return (canvas, sizes), torch.tensor(labels), torch.tensor(indices), [b for group in bad for b in group]


def decode_on_device(images, device):
    """`DecodedImages(encoded=True)` items -> list of uint8 [3, H, W] on `device`; JPEG bytes are
    decoded in one batched torchvision.io.decode_jpeg call there (nvJPEG on CUDA)."""
    import torchvision.io as tio

    encoded = [i for i, image in enumerate(images) if image.ndim == 1]
    out = [image.to(device, non_blocking=True) for image in images]
    if encoded:
        decoded = tio.decode_jpeg([images[i] for i in encoded], mode=tio.ImageReadMode.RGB, device=device)
        for i, image in zip(encoded, decoded):
            out[i] = image
    return out


class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch shuffle split across ranks, resumable in the middle of an epoch.

    Yields (epoch, index) pairs. Every rank sees `num_samples` = floor(N / world)
    samples (the tail that does not divide is dropped, as DistributedSampler does with
    drop_last), so all ranks run the same number of steps. `set_epoch(epoch, start)`
    skips the first `start` samples of this rank's share (exact resume).
    """

    def __init__(self, n, rank=0, world_size=1, seed=0, shuffle=True):
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.num_samples = n // world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def order(self, epoch):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[:self.num_samples * self.world_size][self.rank::self.world_size]

    def __iter__(self):
        for i in self.order(self.epoch)[self.start:].tolist():
            yield (self.epoch, i)

    def __len__(self):
        return self.num_samples - self.start


def _ignore_preemption(_worker_id):
    """A loader worker leaves SIGTERM / SIGUSR1 to the training process: a scheduler that signals every process of
    the job (SLURM does) would otherwise kill the workers, and the training process would fail on a dead worker
    instead of finishing its step and writing a checkpoint (common/guard.py). A worker still ends with its parent."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset, sampler, batch_size, workers, device, collate_fn=collate):
    """A DataLoader for training: drop_last, pinned memory on GPU, persistent workers that ignore the
    preemption signals (the training process handles them).

    Its own generator: each new iterator (every epoch, and once more on resume) draws its
    workers' base seed from it, not from the training loop's global RNG, which therefore
    stays on the uninterrupted run's sequence after a resume.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=torch.device(device).type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
        worker_init_fn=_ignore_preemption if workers > 0 else None)
