"""Build script for fastmup.

Nothing here imports torch: pip's isolated build environment would otherwise
pull a CUDA build of torch just to read this file.  The CUDA/C++ sources in
``csrc/`` are compiled on first use (see ``fastmup/ext``), not at build time.
"""
import sys

from setuptools import find_packages, setup

install_requires = ["torch>=2.4", "numpy", "pyyaml", "typing_extensions>=4.1"]
if sys.platform.startswith("linux"):
    install_requires.append("triton")

setup(
    name="fastmup",
    version="0.1.0",
    description="Maximal Update Parametrization with fused multi-tensor optimizers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["fastmup", "fastmup.*"]) + ["fastmup.kernels", "fastmup.csrc"],
    package_dir={"fastmup.kernels": "kernels", "fastmup.csrc": "csrc"},
    # The C++/CUDA sources ship as data (fastmup/csrc when installed) and are
    # compiled on first use by fastmup.ext, which also finds <repo>/csrc in a checkout.
    package_data={"fastmup.csrc": ["*.h", "*.cuh", "*.cu", "*.cpp", "host/*.h", "host/*.inc", "host/*.cpp", "plan/*.cpp"]},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest", "pandas", "matplotlib", "tqdm", "rich", "scikit-learn", "pytorch-lightning"],
        "plot": ["matplotlib", "pandas", "tqdm"],
        "bench": ["rich", "matplotlib", "tqdm", "pytest-benchmark"],
        "ext": ["pybind11", "ninja"],
        # fastmup.integrations.transformers; pinned: the integration relies on
        # transformers' attention modules, readout accessors and Trainer, and
        # these versions resolve beside an installed torch without replacing it.
        "hf": ["transformers==5.24.0", "accelerate==1.15.0"],
    },
    entry_points={"console_scripts": ["fastmup-bench=fastmup.bench:main", "fastmup-inspect=fastmup.inspect.__main__:main"]},
)
