"""Build script for pyengine's C++/CUDA extension ``pyengine._C``.

Metadata lives in pyproject.toml; this file only adds the extension module.

Variant selection (one line saying which variant is built is printed):

* C++ sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built, with -O3 and OpenMP when the
  compiler supports it and torch uses the OpenMP parallel backend.
* CUDA sources (csrc/cuda/*.cu) are built when they can run or when asked:
    - asked: FORCE_CUDA=1 or PYENGINE_CUDA=1 (CI sets it, so that a CUDA compile error fails
      CI on a machine without a GPU); the build then fails, saying why, if it cannot compile
      them (a CPU build of torch, no nvcc, a toolkit whose major version is not torch's);
    - otherwise only when torch sees a CUDA GPU (and the toolkit fits; else a warning and C++
      only). A machine without a GPU builds the C++ kernels only: compiling CUDA kernels it
      cannot run cost minutes of nvcc for nothing;
    - PYENGINE_NO_CUDA=1 always skips them.
  The CUDA variant targets TORCH_CUDA_ARCH_LIST, "8.0;9.0" (sm_80, sm_90) unless set. No kernel
  uses Hopper-only instructions (wgmma/TMA), so there is no sm_90a target.
* A toolkit from pip wheels (nvidia-cuda-nvcc & co under site-packages/nvidia/cu13, what
  .ci/run installs) works too: see _cudart_link_dir.

Rebuilds are incremental: the objects live in a persistent folder build/ext-<variant>-<python>-
torch<version> (not in the temporary folder pip gives an editable install), so ninja recompiles
only the sources that changed, and ccache is used when it is on the PATH. A second
``pip install --no-build-isolation -e .`` with unchanged sources only relinks.

CUDA_HOME is resolved here, before torch.utils.cpp_extension is imported, because that module
derives it from ``which nvcc`` at import time, which is wrong when nvcc is a wrapper script or a
link outside the toolkit (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_VARIANT = "cpp"  # set by _extensions(): "cpp" or "cuda" (names the persistent build folder)
DEFAULT_ARCH_LIST = "8.0;9.0"


def _log(msg: str) -> None:
    print(f"[pyengine setup] {msg}", flush=True)


def _is_toolkit(path: str | None) -> bool:
    """A directory that holds a CUDA toolkit: bin/nvcc and include/cuda_runtime.h."""
    if not path:
        return False
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _toolkit_from_nvcc_dryrun(nvcc: str) -> str | None:
    """Ask nvcc where it lives (works through wrapper scripts): `nvcc --dryrun` prints _HERE_."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    if not m:
        return None
    return os.path.dirname(os.path.realpath(m.group(1)))


def _resolve_cuda_home() -> str | None:
    """env CUDA_HOME / CUDA_PATH, else the toolkit holding `which nvcc`, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        env = os.environ.get(var)
        if env:
            if _is_toolkit(env):
                return env
            _log(f"warning: {var}={env} does not look like a CUDA toolkit (no bin/nvcc or "
                 f"include/cuda_runtime.h); looking elsewhere")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(cand):
            return cand
        cand = _toolkit_from_nvcc_dryrun(nvcc)
        if _is_toolkit(cand):
            return cand
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


# Resolve the toolkit BEFORE torch.utils.cpp_extension is imported (it reads CUDA_HOME once).
_CUDA_HOME = None if os.environ.get("PYENGINE_NO_CUDA") == "1" else _resolve_cuda_home()
if _CUDA_HOME:
    os.environ["CUDA_HOME"] = _CUDA_HOME

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if _CUDA_HOME and getattr(cpp_extension, "CUDA_HOME", None) != _CUDA_HOME:
    # cpp_extension was imported earlier by something else and cached a wrong guess
    cpp_extension.CUDA_HOME = _CUDA_HOME


def _cuda_asked() -> str | None:
    """The variable that asks for the CUDA kernels whatever the machine (FORCE_CUDA=1 or
    PYENGINE_CUDA=1), or None."""
    for var in ("PYENGINE_CUDA", "FORCE_CUDA"):
        if os.environ.get(var) == "1":
            return var
    return None


def _cuda_decision() -> tuple[bool, str]:
    if os.environ.get("PYENGINE_NO_CUDA") == "1":
        return False, "PYENGINE_NO_CUDA=1"
    asked = _cuda_asked()
    if asked is None and not torch.cuda.is_available():
        return False, ("no CUDA GPU visible; set FORCE_CUDA=1 to compile the CUDA kernels "
                       "anyway")

    def cannot(why: str) -> tuple[bool, str]:
        if asked:
            raise SystemExit(f"[pyengine setup] error: {asked}=1 asks for the CUDA kernels, but "
                             f"{why}")
        return False, why

    if torch.version.cuda is None:
        return cannot(f"torch {torch.__version__} is not a CUDA build")
    if not _CUDA_HOME:
        return cannot("no CUDA toolkit with nvcc found (set CUDA_HOME to one)")
    tk = _nvcc_version(_CUDA_HOME)
    if tk is None:
        return cannot(f"could not read the nvcc version of {_CUDA_HOME}")
    if tk.split(".")[0] != torch.version.cuda.split(".")[0]:
        why = (f"the CUDA toolkit {tk} at {_CUDA_HOME} does not match the major version of "
               f"torch's CUDA {torch.version.cuda}; install a CUDA "
               f"{torch.version.cuda.split('.')[0]}.x toolkit (or set CUDA_HOME)")
        if not asked:
            _log("WARNING: " + why + "; building the C++ (CPU) kernels only")
        return cannot(why)
    reason = f"{asked}=1" if asked else "a CUDA GPU is visible"
    return True, f"{reason}; toolkit CUDA {tk} at {_CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _cudart_link_dir(cuda_home: str) -> str | None:
    """A directory holding a `libcudart.so` link when the toolkit has only libcudart.so.<major>.

    The pip wheels of the toolkit (nvidia-cuda-runtime, used by .ci/run) ship the versioned
    library alone, but CUDAExtension links with -lcudart. The link points at the very library
    torch itself loads at run time.
    """
    for sub in ("lib64", "lib"):
        if os.path.exists(os.path.join(cuda_home, sub, "libcudart.so")):
            return None
    for sub in ("lib64", "lib"):
        versioned = sorted(glob.glob(os.path.join(cuda_home, sub, "libcudart.so.*")))
        if versioned:
            link_dir = os.path.join(ROOT, "build", "cudart-link")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(versioned[0], link)
            _log(f"linking cudart through {link} -> {versioned[0]}")
            return link_dir
    return None


def _compiler_supports(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            r = subprocess.run([cxx, flag, src, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "darwin" or os.environ.get("PYENGINE_NO_OPENMP") == "1":
        return [], []
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return [], []
    if not _compiler_supports("-fopenmp"):
        _log("warning: the C++ compiler does not accept -fopenmp; CPU kernels run single-threaded")
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    cpp_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    omp_cflags, omp_lflags = _openmp_flags()
    # the C++ standard comes from cpp_extension (torch's); at::vec's headers use `#pragma
    # unroll`, which GCC does not know (torch builds with -Wno-unknown-pragmas too)
    cxx_flags = ["-O3", "-Wno-unknown-pragmas", *omp_cflags]
    include_dirs = [os.path.join(ROOT, "csrc")]

    global _VARIANT
    with_cuda, why = _cuda_decision()
    if with_cuda and not cu_sources:
        with_cuda, why = False, "no csrc/cuda/*.cu sources"
    _VARIANT = "cuda" if with_cuda else "cpp"
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # cpp_extension turns it into -gencode flags
        _log(f"building pyengine._C: C++ + CUDA variant (archs {arch}; {why}; "
             f"OpenMP {'on' if omp_cflags else 'off'})")
        link_dir = _cudart_link_dir(_CUDA_HOME)
        return [CUDAExtension(
            name="pyengine._C",
            sources=cpp_sources + cu_sources,
            include_dirs=include_dirs,
            library_dirs=[link_dir] if link_dir else [],
            define_macros=[("PYENGINE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=omp_lflags,
        )]
    _log(f"building pyengine._C: C++ (CPU) only variant ({why}; "
         f"OpenMP {'on' if omp_cflags else 'off'})")
    return [CppExtension(
        name="pyengine._C",
        sources=cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=omp_lflags,
    )]


def _packages() -> list[str]:
    pkgs = find_packages(where=ROOT, include=["pyengine", "pyengine.*"])
    for p in ("pyengine", "pyengine.ops"):  # also before their __init__.py files exist
        if p not in pkgs:
            pkgs.append(p)
    kernels = find_packages(where=os.path.join(ROOT, "kernels"))
    return sorted(pkgs + ["pyengine.kernels"] + [f"pyengine.kernels.{k}" for k in kernels])


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with a persistent object folder (incremental rebuilds) and ccache."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{_VARIANT}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        self.build_temp = os.path.join(ROOT, "build", f"ext-{tag}")
        os.makedirs(self.build_temp, exist_ok=True)

    def build_extensions(self):
        ccache = shutil.which("ccache")
        if ccache and os.environ.get("PYENGINE_NO_CCACHE") != "1":
            # ninja runs the compiler command line; put ccache in front of it
            for attr in ("compiler_so", "compiler_cxx"):
                cmd = getattr(self.compiler, attr, None)
                if isinstance(cmd, list) and cmd and os.path.basename(cmd[0]) != "ccache":
                    setattr(self.compiler, attr, [ccache, *cmd])
        super().build_extensions()


setup(
    packages=_packages(),
    package_dir={"pyengine": "pyengine", "pyengine.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
)
