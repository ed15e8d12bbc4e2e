"""Builds common/assets/cifar10_test_{0,1}.npz: CIFAR-10's whole test split (10,000 images) as JPEG bytes.

The evaluation set of the convergence tests, the demo and bench/convergence.py, shipped so that
every machine scores on the same 10,000 images. It reads an ImageFolder copy of CIFAR-10
(`<root>/test/<class>/*.jpg`, the layout scripts/make_cifar10_mini.py also reads) and stores
the JPEG bytes as they are (no re-encoding), in ImageFolder order (classes sorted, then file
names), in two files of 5,000 images (classes 0-4 and 5-9, under 5 MB each): per file one uint8
array of all bytes, per-image offsets, labels and class names.

    python scripts/make_cifar10_test.py /path/to/cifar10 common/assets
"""
import sys
from pathlib import Path

import numpy as np


def main(root, out):
    test = Path(root) / "test"
    classes = sorted(p.name for p in test.iterdir() if p.is_dir())
    blobs, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((test / name).glob("*.jpg")):
            blobs.append(path.read_bytes())
            labels.append(label)
    if len(blobs) != 10000:
        sys.exit(f"{test} holds {len(blobs)} JPEGs; CIFAR-10's test split has 10,000.")
    half = len(blobs) // 2
    for part, rows in enumerate((slice(0, half), slice(half, None))):
        np.savez(Path(out) / f"cifar10_test_{part}.npz", classes=np.array(classes),
                 test_bytes=np.frombuffer(b"".join(blobs[rows]), dtype=np.uint8),
                 test_offsets=np.cumsum([0] + [len(b) for b in blobs[rows]]).astype(np.int64),
                 test_labels=np.array(labels[rows], dtype=np.int64))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:3])
