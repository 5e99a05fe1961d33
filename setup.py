"""Install RxT for Hugging Face under one namespace, ``rxt_hf``.

The checkout keeps its folders at the top (``modeling_rxt/`` is also the remote-code folder saved beside every
model); installed, each is a sub-package of ``rxt_hf``: ``rxt_hf.modeling_rxt``, ``rxt_hf.trainers``, ...
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
NAMESPACE = "rxt_hf"
FOLDERS = ["modeling_rxt", "trainers", "recipes", "benchmarks", "model_cards", "serving"]
# The version is written once, in rxt_hf/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / NAMESPACE / "__init__.py").read_text(), re.M).group(1)

PACKAGES = [NAMESPACE]
PACKAGE_DIR = {NAMESPACE: NAMESPACE}
for folder in FOLDERS:
    for package in [folder, *(f"{folder}.{sub}" for sub in find_packages(where=folder))]:
        PACKAGES.append(f"{NAMESPACE}.{package}")
        PACKAGE_DIR[f"{NAMESPACE}.{package}"] = package.replace(".", "/")

setup(
    name="rxt-hf",
    version=VERSION,
    description="Reactive Transformer (RxT) as a native Hugging Face transformers model, with trainers for the full RxT curriculum.",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    author="the rxt-hf authors",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={
        f"{NAMESPACE}.recipes": ["*.yaml", "accelerate/*"],
        f"{NAMESPACE}.model_cards": ["*.md"],
        f"{NAMESPACE}.serving": ["static/*"],
    },
    install_requires=[
        "torch>=2.6",  # accelerate's floor; CI runs 2.13
        "transformers>=5.23,<6",
        "accelerate>=1.10.1",
        "peft>=0.18",
        "trl>=1.16",  # MRL / RxRLHF use TRL's configs and public utilities only (tests check no private member)
        "datasets>=4.7",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "pyyaml",
        "matplotlib>=3.7",  # the PNGs of rxt train / rxt eval
    ],
    extras_require={
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "redis>=5", "httpx>=0.27"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "matplotlib>=3.7",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "redis>=5",
            "httpx>=0.27",
            "playwright>=1.40",
            "sacrebleu>=2.4",
        ],
        "tensorboard": ["tensorboard"],
        "bench": ["sacrebleu>=2.4"],  # the tensorbleu benchmark compares against sacrebleu
    },
    entry_points={"console_scripts": ["rxt=rxt_hf.recipes.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
