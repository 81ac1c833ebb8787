"""Build of safa_kernels._C, the compiled merge kernels.

Always a C++ extension with the CPU kernel (csrc/merge_cpu.cpp). With CUDA, the same
module also carries the CUDA kernel (csrc/cuda/): built when the installed torch has
CUDA and nvcc is found (CUDA_HOME), or forced with FORCE_CUDA=1 (e.g. a GPU-less build
box); FORCE_CUDA=0 builds the CPU kernel only (a fallback after a failed CUDA build).
TORCH_CUDA_ARCH_LIST picks the GPU architectures, as for any torch extension.

Build against the torch already installed (an isolated build would download another):

    pip install --no-build-isolation -e .
"""
import os
import re

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The one version string, ``safa.__version__`` (read, not imported: the build has no safa yet)."""
    with open(os.path.join(HERE, "safa", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _want_cuda() -> bool:
    import torch
    if os.environ.get("FORCE_CUDA") == "0":  # explicitly off (unset: automatic)
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        # Forcing works on a GPU-less machine, not with a CPU-only torch: the CUDA glue
        # links against torch's CUDA libraries.
        if torch.version.cuda is None:
            raise RuntimeError(f"FORCE_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} is CPU-only")
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cpu_sources = ["csrc/merge_cpu.cpp"]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch requires (cpp_extension adds it)
    if not _want_cuda():
        return cpp_extension.CppExtension("safa_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return cpp_extension.CUDAExtension(
        "safa_kernels._C",
        cpu_sources + ["csrc/cuda/merge_cuda.cpp", "csrc/cuda/merge_kernel.cu"],
        define_macros=[("SAFA_WITH_CUDA", "1")],
        # -fmad=false: no fused multiply-add, so weighted means round like the CPU and Triton
        # kernels (Triton disables it too); the kernel is memory-bound, FMA buys nothing.
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-fmad=false"]},
    )


setup(
    name="safa",
    version=_version(),
    description="Training-free long-form generation with diffusion models (Latent Swap Joint Diffusion), "
                "with fused merge kernels for overlapping views",
    packages=find_packages(include=["safa_kernels*", "safa*"]),
    python_requires=">=3.9",
    # torch itself is deliberately absent: it is installed pinned (CPU or CUDA build) before
    # this package, and listing it would let pip replace it.
    install_requires=["numpy", "diffusers", "transformers", "soundfile", "scipy", "pillow", "matplotlib"],
    # Stable Audio Open's CosineDPMSolverMultistep scheduler imports torchsde; safa serve's page is Gradio
    # (the version the tests ran with is pinned in requirements-dev.txt).
    extras_require={"stable-audio": ["torchsde"], "serve": ["gradio>=6.31,<7"], "video": ["av"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["safa=safa.cli:main"]},
    zip_safe=False,
)
