"""rsvl_jax: remote-sensing vision-language models (PIR, BITA) in JAX + Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="rsvl_jax",
    version="0.1.0",
    description="Remote-sensing vision-language models (PIR retrieval, BITA captioning) in JAX/Flax NNX",
    packages=find_packages(include=["rsvl_jax", "rsvl_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "numpy",
        "transformers",
        "tokenizers",
        "safetensors",
        "tensorflow-datasets",
        "grain",
        "pillow",
        "pycocoevalcap",
        "tensorboardX",
        "tqdm",
        "tifffile",  # TIFF / GeoTIFF bands of your own images (rsvl_jax.data.images)
        "matplotlib",  # recall curves and VIR heatmaps in evaluation reports
    ],
    extras_require={
        # torch only reads PyTorch checkpoints; pin the CPU build that lies on the CI disk.
        "convert": ["torch==2.13.0"],
        "test": ["torch==2.13.0", "pytest", "pytest-xdist"],
    },
)
