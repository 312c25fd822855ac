"""Installs the ``boxteacher`` package from ``projects/BoxTeacher/boxteacher``."""

from setuptools import find_packages, setup

PACKAGE_ROOT = "projects/BoxTeacher"

setup(
    name="boxteacher",
    version="0.1.0",
    description=(
        "BoxTeacher, BoxInst and CondInst: instance segmentation from boxes, in plain PyTorch"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    package_dir={"": PACKAGE_ROOT},
    packages=find_packages(where=PACKAGE_ROOT, include=["boxteacher", "boxteacher.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "pycocotools>=2.0.6",
        "numpy",
        "opencv-python-headless>=4.5",
        "pillow",
        "tensorboard",
        "tabulate",
        "matplotlib",
    ],
    # ruff: the lint and format checks of .ci/run; its style changes between minor versions.
    extras_require={"dev": ["pytest>=7", "ruff>=0.17.6,<0.18"]},
)
