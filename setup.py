"""Build sfron_ops: the Python package plus, when possible, the compiled kernels ``sfron_ops._C``.

Switches (environment variables):
  SFRON_OPS_NO_EXT=1        build no compiled extension (the package still works: reference/foreach/triton)
  SFRON_OPS_BUILD_CUDA=0|1  leave out / require the CUDA kernels (default: built when torch has CUDA, nvcc
                            exists and a GPU is visible; compiling them takes about 9 minutes on two cores)
  TORCH_CUDA_ARCH_LIST      CUDA architectures (default here: "8.0;9.0")
  MAX_JOBS                  parallel compile jobs (honoured by torch's BuildExtension)
  DEBUG=1                   -O0 -g
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_include_dirs() -> list[str]:
    """cuBLAS/cuSPARSE headers come with torch's nvidia-* wheels when no full toolkit is installed."""
    dirs = []
    for site in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cublas/include",
                    "nvidia/cusparse/include"):
            path = os.path.join(site, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


def _set_cuda_home() -> None:
    """Point torch at a whole CUDA toolkit.

    torch guesses CUDA_HOME from the folder above ``nvcc`` on the PATH; where that ``nvcc`` is a
    wrapper script (``/usr/local/bin/nvcc``), the guess has no ``lib64/libcudart.so`` and linking fails.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(os.path.join(home, "lib*", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def extensions():
    if _flag("SFRON_OPS_NO_EXT") == "1":
        print("sfron_ops: SFRON_OPS_NO_EXT=1, building no compiled extension")
        return [], {}
    _set_cuda_home()
    # torch logs "No CUDA runtime is found" on import wherever no GPU is visible; the lines below say what is built
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("sfron_ops: torch is not importable at build time (use --no-build-isolation); "
              "building no compiled extension")
        return [], {}

    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    if not cpu_sources:
        return [], {}

    want_cuda = _flag("SFRON_OPS_BUILD_CUDA")
    if want_cuda is None:
        home = cpp_extension.CUDA_HOME  # None wherever torch has no CUDA
        have_nvcc = shutil.which("nvcc") is not None or bool(home and os.path.exists(os.path.join(home, "bin", "nvcc")))
        # without a GPU here the CUDA kernels would only be compiled, never run: leave them to an explicit request
        checks = (("torch has no CUDA", torch.version.cuda is None), ("no nvcc", not have_nvcc),
                  ("no GPU is visible", torch.cuda.device_count() == 0))
        missing = [why for why, lacking in checks if lacking]
        build_cuda = not missing and bool(cuda_sources)
        why_not = (f"{', '.join(missing)}. SFRON_OPS_BUILD_CUDA=1 builds them (make then installs the CUDA build of "
                   "torch), about 9 minutes more on two cores")
    else:
        build_cuda = want_cuda == "1"
        why_not = "SFRON_OPS_BUILD_CUDA=0"
        if build_cuda and torch.version.cuda is None:
            raise RuntimeError("SFRON_OPS_BUILD_CUDA=1 but the installed torch has no CUDA")

    debug = _flag("DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # no -march=native (portable wheels); no contraction into FMAs, so every op rounds like the reference;
    # no errno from sqrt, so the compiler may vectorise it
    cxx += ["-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DSFRON_OPS_PY_MODULE"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    # --fmad=false: multiply and add round separately, as the reference's separate ops do
    nvcc += ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(
        name="sfron_ops._C",
        include_dirs=include_dirs,
        extra_link_args=["-fopenmp"],
    )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        ext = cpp_extension.CUDAExtension(
            sources=cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSFRON_OPS_WITH_CUDA"], "nvcc": nvcc + ["-DSFRON_OPS_WITH_CUDA"]},
            **{**kwargs, "include_dirs": include_dirs + _cuda_include_dirs()},
        )
        print(f"sfron_ops: building the CPU and CUDA kernels ({len(cpu_sources)} C++ and {len(cuda_sources)} CUDA "
              f"files, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext = cpp_extension.CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx}, **kwargs)
        print(f"sfron_ops: building the CPU kernels ({len(cpu_sources)} C++ files); no CUDA kernels: {why_not}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["sfron_ops", "sfron_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
