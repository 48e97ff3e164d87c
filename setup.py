"""themis_engine: a packed, prefix-shared engine for code reward models.

The Triton kernels live in themis_engine/kernels/: no folder of the tree is named `kernels` at its
root, where it would shadow Hugging Face's `kernels` package (a dependency of transformers 5.x) for
any program started from the source tree.

The C++ packing planner (csrc/planner.cpp -> themis_engine._planner, pybind11) is built where a C++
compiler and pybind11 are there; THEMIS_NO_EXT=1 skips it. It is optional: without pybind11, or when
the compile fails, the install goes on with a warning and themis_engine/packing/planner.py's pure-Python
planner is used. An isolated build (plain `pip install .` / `pip install -e .`) gets pybind11 through
setup_requires (setuptools' backend reports it as a build requirement); `--no-build-isolation` uses
the pybind11 of the environment, if any, and never fetches it.
"""

import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

WANT_EXT = os.environ.get("THEMIS_NO_EXT", "").strip().lower() not in ("1", "true", "yes", "on")
PYBIND11 = "pybind11>=2.10"


def _pybind11_include():
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def _collecting_build_requires() -> bool:
    """True while setuptools' PEP 517 backend runs this file only to collect setup_requires (then
    listing pybind11 makes the isolated build environment install it)."""
    meta, core = sys.modules.get("setuptools.build_meta"), sys.modules.get("distutils.core")
    return meta is not None and core is not None and core.Distribution is getattr(meta, "Distribution", None)


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a failed compile warns and leaves the extension out."""

    def build_extensions(self):
        unix = self.compiler.compiler_type == "unix"
        flags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-pthread"] if unix else ["/O2", "/std:c++17"]
        for ext in self.extensions:
            ext.extra_compile_args = flags + list(ext.extra_compile_args or [])
            if unix:
                ext.extra_link_args = ["-pthread"] + list(ext.extra_link_args or [])
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as err:  # no compiler, a compile or link error: fall back to pure Python
            names = ", ".join(e.name for e in self.extensions)
            sys.stderr.write(
                f"WARNING: building {names} failed ({type(err).__name__}: {err}); "
                "installing without it (themis_engine uses its pure-Python planner)\n"
            )
            self.extensions = []


ext_modules, setup_requires = [], []
if WANT_EXT:
    include = _pybind11_include()
    if include is not None:
        ext_modules.append(
            Extension("themis_engine._planner", ["csrc/planner.cpp"], include_dirs=[include], language="c++")
        )
        setup_requires.append(PYBIND11)
    elif _collecting_build_requires():
        setup_requires.append(PYBIND11)
    else:
        sys.stderr.write("WARNING: pybind11 not found: building without the C++ planner (THEMIS_NO_EXT=1 "
                         "silences this)\n")

setup(
    name="themis-engine",
    version="0.1.0",
    description="Fast training, scoring and evaluation of Bradley-Terry code reward models",
    python_requires=">=3.10",
    # every package under themis_engine/ is found (a new folder needs no entry here)
    packages=find_packages(include=["themis_engine", "themis_engine.*"]),
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
    setup_requires=setup_requires,
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
)
