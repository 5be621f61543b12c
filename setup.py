import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# The version is defined once, in fusedce/__init__.py (read, not imported: that imports torch).
VERSION = re.search(r'^__version__ = "([^"]+)"$',
                    (HERE / "fusedce" / "__init__.py").read_text(encoding="utf-8"), re.M)[1]

setup(
    name="fusedce",
    version=VERSION,
    description="Fused, memory-lean cross-entropy for language-model training (Triton + PyTorch)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    # one tree, no package_dir mapping: the kernels are the subpackage fusedce/kernels/
    packages=find_packages(include=["fusedce", "fusedce.*"]),
    # GPT-2's merge ranks, so that the tokenizer works offline (fusedce/app/data/README.md)
    package_data={"fusedce.app": ["data/gpt2.tiktoken", "data/README.md"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "tiktoken>=0.7",
        # Triton's interpreter (`--backend triton` on a CPU) imports it, and torch warns on
        # import ("Failed to initialize NumPy") without it: torch does not require it
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6",
                "ruff>=0.5",
                "expecttest",  # torch.testing._internal (PyTorch's own test samples)
                "matplotlib>=3.5", "tqdm>=4", "transformers>=4.40", "accelerate>=1.0",
                "kernels"],  # Hugging Face's: tests/test_packaging.py checks no shadowing
        # `fusedce train`: progress bar and loss-curve plot (`fusedce demo` needs neither)
        "demo": ["matplotlib>=3.5", "tqdm>=4"],
        # Hugging Face models: fusedce.hf.apply / fusedce.patched() (tests/test_hf*.py);
        # accelerate for transformers' Trainer
        "hf": ["transformers>=4.40", "accelerate>=1.0"],
        # `python -m bench` and `pytest bench/ --benchmark-only`
        "bench": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.5", "tqdm>=4"],
    },
    entry_points={"console_scripts": ["fusedce=fusedce.app.cli:main"]},
)
