"""Install RxT for Hugging Face: the model (remote-code folder), trainers, recipes and benchmarks."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"

_TOP_LEVEL = ["modeling_rxt", "trainers", "recipes", "benchmarks", "model_cards", "serving"]

setup(
    name="rxt-hf",
    version="0.1.0",
    description="Reactive Transformer (RxT) as a native Hugging Face transformers model, with trainers for the full RxT curriculum.",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    author="the rxt-hf authors",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=[name for top in _TOP_LEVEL for name in (top, f"{top}.*")]),
    package_data={
        "recipes": ["*.yaml"],
        "model_cards": ["*.md"],
        "serving": ["static/*"],
    },
    install_requires=[
        "torch>=2.6",  # accelerate's floor; CI runs 2.13
        "transformers>=5.23,<6",
        "accelerate>=1.10.1",
        "peft>=0.18",
        # MRL / RxRLHF override TRL's private GRPOTrainer / DPOTrainer methods (_generate_and_score_completions,
        # _compute_loss, _calculate_rewards, _prepare_dataset, _set_signature_columns_if_needed): one minor series.
        "trl>=1.16,<1.17",
        "datasets>=4.7",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "pyyaml",
        "sacrebleu>=2.4",
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
        ],
        "tensorboard": ["tensorboard"],
        "bench": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["rxt=recipes.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: OS Independent",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
