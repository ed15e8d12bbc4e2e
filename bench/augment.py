"""Throughput of the batched augmentations (common/gpu_aug.py) vs torchvision's
per-image pipeline, measured in the same run, printed as JSON.

Cases (two SimCLR views per image, img/s counts source images):
* cifar32: batch 256 of 32x32 images (CIFAR-10 JPEGs, the embedded cifar10-mini's
  training images), RandomResizedCrop(32, (0.08, 1)), flip, ColorJitter
  (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, no blur, normalise.
    a = torchvision.transforms per image on PIL images (+ torch.stack, the collate)
    a_v2_uint8 = torchvision.transforms.v2 per image on uint8 tensors (info)
    a_pil_dataloader_2workers = a in a DataLoader with 2 worker processes, i.e.
        the per-image path using both cores (info; b runs in one process, 2 threads)
    b = ViewAugmentation.views on the uint8 batch [256, 3, 32, 32]
* imagenet224 (information): batch 32 of random-size 256-500 px images,
  RandomResizedCrop(224) + flip + jitter + grayscale + GaussianBlur(23) p=0.5;
  a on PIL images, b on the list of uint8 tensors (padded into one canvas).

Decoding is not timed.  OMP_WAIT_POLICY defaults to PASSIVE here (set before
torch is imported; override it in the environment): on this shared 2-core
machine, with libgomp's default spinning, every multi-threaded torch op can
stall a scheduler tick when another process holds the other core (measured:
the batched path drops from ~10k to ~150 img/s, torchvision's v2 tensor path
from ~1k to ~40 img/s).  PIL's per-image path is single-threaded either way.  Repetitions of a and b alternate and the median is
reported, so load from other processes hits both alike.
Usage: python bench/augment.py [--threads 2] [--reps 7]
"""

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see docstring)
import statistics
import sys
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.gpu_aug import ViewAugmentation  # noqa: E402

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
def cifar_images(n, seed=0):
    """n of cifar10-mini's 4,000 training JPEGs (embedded in the repository), decoded, chosen by `seed`."""
    from common import data

    train = data.build_dataset("cifar10-mini", "train")
    rng = np.random.default_rng(seed)
    return [train[int(i)][0] for i in rng.choice(len(train), n, replace=False)], "cifar10-mini jpegs"


def random_images(n, lo, hi, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(lo, hi + 1, size=2)
        # smooth-ish content: upsampled noise
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((int(w), int(h)), Image.BILINEAR))
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(fns, reps):
    """Alternate the callables; median seconds per call of each."""
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def simclr_tv(size, blur_kernel=None, mean=IN_MEAN, std=IN_STD, v2=False):
    M = T2 if v2 else T
    ops = [M.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), M.RandomHorizontalFlip(),
           M.RandomApply([M.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), M.RandomGrayscale(0.2)]
    if blur_kernel:
        ops.append(M.RandomApply([M.GaussianBlur(blur_kernel, (0.1, 2.0))], p=0.5))
    ops += ([T2.ToDtype(torch.float32, scale=True)] if v2 else [T.ToTensor()]) + [M.Normalize(mean, std)]
    return M.Compose(ops)


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, images, tf, length):
        self.images, self.tf, self.length = images, tf, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        im = self.images[i % len(self.images)]
        return self.tf(im), self.tf(im)


def dataloader_img_s(images, tf, batch, workers, batches, reps):
    """torchvision per-image pipeline in a DataLoader with ``workers`` processes
    (what a training script does), steady state: img/s over ``batches`` batches."""
    def worker_init(_):
        torch.set_num_threads(1)

    loader = torch.utils.data.DataLoader(_TwoViews(images, tf, batch * batches), batch_size=batch,
                                         num_workers=workers, persistent_workers=True,
                                         worker_init_fn=worker_init, prefetch_factor=2)
    for _ in loader:  # warm-up epoch: starts the workers
        pass
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in loader:
            pass
        best.append(batch * batches / (time.perf_counter() - t))
    del loader
    return statistics.median(best)


def case_cifar32(reps):
    B = 256
    pil, source = cifar_images(B)
    u8_list = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in pil]
    batch = torch.stack(u8_list)
    tv = simclr_tv(32, mean=CIFAR_MEAN, std=CIFAR_STD)
    tv2 = simclr_tv(32, mean=CIFAR_MEAN, std=CIFAR_STD, v2=True)
    ours = ViewAugmentation(32, scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                            jitter_p=0.8, grayscale_p=0.2, blur_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD)
    g = torch.Generator().manual_seed(0)
    t = compare({
        "a": lambda: (torch.stack([tv(im) for im in pil]), torch.stack([tv(im) for im in pil])),
        "a_v2_uint8": lambda: (torch.stack([tv2(im) for im in u8_list]), torch.stack([tv2(im) for im in u8_list])),
        "b": lambda: ours.views(batch, 2, g),
    }, reps)
    a_dl = dataloader_img_s(pil, tv, B, workers=2, batches=8, reps=3)
    return {
        "images": source, "batch": B, "views": 2,
        "a_torchvision_pil_img_s": round(B / t["a"], 1),
        "a_pil_dataloader_2workers_img_s": round(a_dl, 1),
        "a_v2_uint8_tensor_img_s": round(B / t["a_v2_uint8"], 1),
        "b_batched_uint8_img_s": round(B / t["b"], 1),
        "ratio_b_over_a": round(t["a"] / t["b"], 2),
        "ratio_b_over_a_v2_uint8": round(t["a_v2_uint8"] / t["b"], 2),
        "ratio_b_over_a_dataloader_2workers": round(B / t["b"] / a_dl, 2),
    }


def case_imagenet224(reps):
    B = 32
    pil = random_images(B, 256, 500)
    u8_list = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in pil]
    tv = simclr_tv(224, blur_kernel=23)
    ours = ViewAugmentation(224, blur_p=0.5, blur_kernel_size=23)
    g = torch.Generator().manual_seed(0)
    t = compare({
        "a": lambda: (torch.stack([tv(im) for im in pil]), torch.stack([tv(im) for im in pil])),
        "b": lambda: ours.views(u8_list, 2, g),
    }, reps)
    return {
        "images": "random 256-500 px", "batch": B, "views": 2, "blur": "k=23 p=0.5",
        "a_torchvision_pil_img_s": round(B / t["a"], 1),
        "b_batched_uint8_list_img_s": round(B / t["b"], 1),
        "ratio_b_over_a": round(t["a"] / t["b"], 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--skip-224", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {
        "device": "cpu", "threads": args.threads, "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "loadavg_start": os.getloadavg()[0],
        "cifar32": case_cifar32(args.reps),
    }
    if not args.skip_224:
        out["imagenet224"] = case_imagenet224(max(3, args.reps // 2))
    out["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
