"""Builds common/assets/cifar10_mini.npz: a class-balanced subset of CIFAR-10's JPEGs.

400 training and 100 test images per class, drawn with a fixed seed from an ImageFolder
copy of CIFAR-10 (`<root>/{train,test}/<class>/*.jpg`). The JPEG bytes are stored as is
(no re-encoding): one uint8 array of all bytes, per-image offsets, labels and class names.

    python scripts/make_cifar10_mini.py /datasets/cifar10 common/assets/cifar10_mini.npz
"""
import random
import sys
from pathlib import Path

import numpy as np

PER_CLASS = {"train": 400, "test": 100}


def main(root, out):
    root = Path(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    arrays = {"classes": np.array(classes)}
    for split, n in PER_CLASS.items():
        blobs, labels = [], []
        for label, name in enumerate(classes):
            files = sorted((root / split / name).glob("*.jpg"))
            for path in sorted(random.Random(f"{split}/{name}").sample(files, n)):
                blobs.append(path.read_bytes())
                labels.append(label)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:3])
