"""Builds the native part of the Python package with CMake (python/CMakeLists.txt: libcollapse.so and
the pybind11 extension only; no tests, bench, examples or CLI) and installs it with the pure-Python
modules of python/collapse. The extension finds libcollapse.so.0 beside it (rpath $ORIGIN).

Environment:
  COLLAPSE_CUDA               OFF (default: a fast CPU-only build), AUTO or ON: also build the CUDA backend
                              module libcollapse_cuda.so (needs nvcc) and install it beside the library.
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: the CPU count).
  COLLAPSE_PY_BUILD_DIR       build directory: CMake's in cmake/, setuptools' scratch beside it (default:
                              build-python-pip/ in the project root, so that a second `pip install`
                              rebuilds only what changed; never build/ itself, the C++ build).
  COLLAPSE_BUILD_TYPE         CMake build type (default Release).
  COLLAPSE_CMAKE_ARGS         more CMake arguments (shell words), e.g. -DCMAKE_PREFIX_PATH=... -DCMAKE_CUDA_ARCHITECTURES=90.
"""
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_DIR = os.path.abspath(os.environ.get("COLLAPSE_PY_BUILD_DIR") or os.path.join(ROOT, "build-python-pip"))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.path.join(BUILD_DIR, "cmake")
        cuda = os.environ.get("COLLAPSE_CUDA", "OFF").upper()
        if cuda not in ("OFF", "AUTO", "ON"):
            raise RuntimeError(f"COLLAPSE_CUDA={cuda}: expected OFF, AUTO or ON")
        cfg = [
            "cmake", "-S", os.path.join(ROOT, "python"), "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={os.environ.get('COLLAPSE_BUILD_TYPE', 'Release')}",
            f"-DCOLLAPSE_CUDA={cuda}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
        ] + shlex.split(os.environ.get("COLLAPSE_CMAKE_ARGS", ""))
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(cfg, check=True, env=env)
        targets = ["_collapse"]
        if os.path.exists(os.path.join(build_dir, "collapse_cuda_module")):
            targets.append("collapse_cuda")
        subprocess.run(["cmake", "--build", build_dir, "--target", *targets], check=True, env=env)

        # The extension, libcollapse.so.0 (its SONAME) and the CUDA module into the package directory.
        dest = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        os.makedirs(dest, exist_ok=True)
        built = _find(build_dir, lambda f: f.startswith("_collapse.") and f.endswith(".so"))
        shutil.copy2(built, self.get_ext_fullpath(ext.name))
        lib = _find(build_dir, lambda f: f == "libcollapse.so.0", follow=True)
        shutil.copy2(os.path.realpath(lib), os.path.join(dest, "libcollapse.so.0"))
        if "collapse_cuda" in targets:
            mod = _find(build_dir, lambda f: f == "libcollapse_cuda.so", follow=True)
            shutil.copy2(os.path.realpath(mod), os.path.join(dest, "libcollapse_cuda.so"))


def _find(top, match, follow=False):
    for d, _, files in os.walk(top):
        for f in files:
            if match(f):
                return os.path.join(d, f)
    raise RuntimeError(f"built file not found under {top}")


setup(
    packages=["collapse"],
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("collapse._collapse")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
    # setuptools' own scratch (build/lib..., bdist, egg-info) also under build-python-pip/, never in
    # build/ (the C++ build directory) nor in the source tree.
    options={"build": {"build_base": os.path.join(BUILD_DIR, "setuptools")},
             "egg_info": {"egg_base": BUILD_DIR}},
)
