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
        "pyyaml>=6",  # YAML config files of train / eval / bench
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # Parquet data files and scores.parquet
        "data": ["pyarrow>=14"],
        # the evaluator's outputs: scores.parquet and the report.png heatmap
        "eval": ["pyarrow>=14", "matplotlib>=3.7"],
        # the OpenRLHF-compatible HTTP scoring server (ASGI)
        "serve": ["starlette>=0.37", "uvicorn>=0.29"],
        "test": [
            "pytest>=8", "pytest-benchmark>=4", "triton>=3.6",
            "pyarrow>=14", "matplotlib>=3.7", "starlette>=0.37", "uvicorn>=0.29", "httpx>=0.27",
        ],
    },
)
