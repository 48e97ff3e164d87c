"""themis_engine: a packed, prefix-shared engine for code reward models.

`kernels/` is installed as the subpackage `themis_engine.kernels` (package_dir below), so nothing
lands under the generic top-level name `kernels`. The C++/CUDA extension of csrc/ is added here
when it exists.
"""

from setuptools import setup

setup(
    name="themis-engine",
    version="0.1.0",
    description="Fast training, scoring and evaluation of Bradley-Terry code reward models",
    python_requires=">=3.10",
    packages=["themis_engine", "themis_engine.kernels"],
    package_dir={"themis_engine": "themis_engine", "themis_engine.kernels": "kernels"},
    install_requires=[
        # torch>=2.11 admits the 2.13.0 CPU wheel on the dev machines and 2.11 on the GPU image
        "torch>=2.11",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy>=1.24",
        "jinja2>=3.1",  # chat templates (transformers needs it to render them)
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.6"],
    },
)
