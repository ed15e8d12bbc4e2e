"""Installs the project (`pip install -e .`) so the scripts run from the repository root.

The custom ops in csrc/ plug in here as the `common._C` extension (see common/ops.py).
"""
from setuptools import setup

setup(
    name="ssl-reference",
    version="0.1.0",
    description="Readable single-file self-supervised learning methods with fast custom ops",
    packages=["common"],
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision>=0.16", "numpy", "pillow"],
)
