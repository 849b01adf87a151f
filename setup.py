"""Builds fedmpq_kernels._C with CMake (see CMakeLists.txt).

Environment:
  FEDMPQ_CUDA=0          skip the CUDA sources even when nvcc is found
  FEDMPQ_CUDA_ARCHS=...  CUDA architectures, CMake syntax (default "80;90")
  FEDMPQ_BUILD_TYPE=...  CMake build type (default Release; RelWithDebInfo with FEDMPQ_SANITIZE=1)
  FEDMPQ_SANITIZE=1      build the C++ sources with AddressSanitizer + UndefinedBehaviorSanitizer
                         (-DFEDMPQ_SANITIZE=ON; off by default). For debugging only: the module
                         then loads only with libasan and libstdc++ preloaded, see
                         tools/sanitize.sh, which builds a copy with it and runs the tests.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        sanitize = os.environ.get("FEDMPQ_SANITIZE", "0").strip().upper() in ("1", "ON", "TRUE", "YES")
        cfg = os.environ.get("FEDMPQ_BUILD_TYPE", "RelWithDebInfo" if sanitize else "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DFEDMPQ_CUDA={os.environ.get('FEDMPQ_CUDA', 'AUTO')}",
            f"-DFEDMPQ_CUDA_ARCHS={os.environ.get('FEDMPQ_CUDA_ARCHS', '80;90')}",
            f"-DFEDMPQ_SANITIZE={'ON' if sanitize else 'OFF'}",
        ]
        if shutil.which("ninja") or _has_ninja_module():
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401  (the PyPI wheel puts the binary on PATH inside the build env)
    except ImportError:
        return False
    return True


setup(
    ext_modules=[CMakeExtension("fedmpq_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
