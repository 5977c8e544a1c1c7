"""Build w4a16_ops: the CUDA extension (w4a16_ops._C) when torch has CUDA and nvcc is found,
a pure-Python package otherwise. Install with the torch you run:

    pip install --no-build-isolation .          # or -e . for development

Environment:
    W4A16_BUILD_CUDA=1|0     force the CUDA build on (fail if impossible) or off; default: auto
    TORCH_CUDA_ARCH_LIST     e.g. "9.0a"; default "8.0;9.0a" (the SMs the kernels target; the wgmma kernel
                             for M >= 64 on H100/H200 needs 9.0a, a plain 9.0 build runs the sm_80-class kernels)
    MAX_JOBS                 parallel nvcc jobs (read by torch.utils.cpp_extension)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"  # 9.0a: Hopper with its own instructions (wgmma), which the sm90 kernel needs


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.strip().splitlines()[-1]


def cuda_build_plan():
    """(build?, reason, nvcc version)."""
    flag = os.environ.get("W4A16_BUILD_CUDA", "auto").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False, "W4A16_BUILD_CUDA=0", None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as e:
        reason = f"torch is not importable at build time ({e}); install torch first and use --no-build-isolation"
        return False, reason, None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None:
        reason = "nvcc / CUDA_HOME not found"
    else:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        version = _nvcc_version(nvcc)
        if version is None:
            reason = f"{nvcc} does not run"
        else:
            return True, "", version
    if flag in ("1", "on", "true", "yes"):
        sys.exit(f"W4A16_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, reason, None


def write_build_info(built, reason, archs, nvcc_version):
    with open(os.path.join(ROOT, "w4a16_ops", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py; not in git.\n")
        f.write(f"CUDA_BUILT = {built!r}\nREASON = {reason!r}\nARCHS = {archs!r}\nNVCC_VERSION = {nvcc_version!r}\n")


build, reason, nvcc_version = cuda_build_plan()
ext_modules, cmdclass = [], {}
archs = None
if build:
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    sources = sorted(glob.glob("csrc/binding/*.cpp")) + sorted(glob.glob("csrc/kernels/*.cu"))
    ext_modules = [
        CUDAExtension(
            "w4a16_ops._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc", "kernels")],
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"],
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            py_limited_api=False,
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
    print(f"w4a16_ops: building the CUDA extension for TORCH_CUDA_ARCH_LIST={archs} with {nvcc_version}")
else:
    print(f"w4a16_ops: pure-Python install (no CUDA extension): {reason}")
write_build_info(build, reason, archs, nvcc_version)

setup(
    name="w4a16_ops",
    version="0.1.0",
    description="4-bit-weight x 16-bit-activation GEMM for PyTorch: one op, CUDA / Triton / reference backends",
    packages=find_packages(include=["w4a16_ops", "w4a16_ops.*"]),
    package_data={"w4a16_ops": ["backends/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "expecttest", "numpy"],
        # Peers are optional: benchmarks/contenders.py times them only when they import.
        "bench": ["matplotlib", "gemlite", "conch-triton-kernels", "humming-kernels"],
        # w4a16_ops.from_pretrained / w4a16_ops.hf_quantizer (tested with transformers 5.24.0, accelerate 1.15.0);
        # compressed-tensors only for enable() (transformers parses those configs with it).
        "hf": ["transformers>=5.24,<6", "accelerate", "safetensors", "compressed-tensors"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
