"""Builds the optional native extension ``fastmeta._C``; all other config is in pyproject.toml.

Each kernel source in ``csrc/`` is compiled once per instruction set (AVX-512, AVX2, generic)
into its own namespace, and ``bindings.cpp`` picks one at import time from the CPU it runs on.
Nothing here probes the build machine's hardware, so a wheel runs on any x86-64 CPU.

Environment:
    FASTMETA_NO_EXTENSIONS=1  skip the extension; fastmeta then runs on the reference path.
    FASTMETA_MARCH_NATIVE=1   also tune the generic build for this machine (-march=native).
                              Opt-in only: the result does not run on older CPUs.
"""

from __future__ import annotations

import os
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Files compiled once per ISA. bindings.cpp is compiled once, with the baseline flags.
KERNEL_SOURCES = [
    "csrc/sgd.cpp", "csrc/adam.cpp", "csrc/adagrad.cpp", "csrc/rmsprop.cpp", "csrc/stream.cpp",
    "csrc/lstm_rule.cpp", "csrc/hypergrad.cpp", "csrc/max_pool.cpp",
]
# Flags for one kernel file only. The LSTM rule is mat-vec products: -std=c++17 (ISO mode)
# turns GCC's FMA contraction off, which halves their throughput, so it is turned back on there.
# The other kernels' build is left exactly as it was.
FILE_FLAGS = {"csrc/lstm_rule.cpp": ["-ffp-contract=fast"]}

# -fno-math-errno lets GCC turn sqrtf into a vector instruction (Adam runs ~3x slower without).
# -fno-trapping-math lets it vectorize the selects of the differentiable kernels' backward
# (e.g. "x̄ = 0 where δ̄ = 0"); nothing here relies on floating-point traps, results are unchanged.
# -fno-trapping-math lets the backward's "0 where nothing depends on it" selects vectorize.
BASE_FLAGS = [
    "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden",
]

# Per-ISA flags; the names match the namespaces declared in csrc/kernels.h.
X86_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}


def _is_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64", "i686", "x86"}


class BuildExt(build_ext):
    def _compiler_accepts(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            except Exception:
                return False
            return True

    def build_extension(self, ext):
        openmp = ["-fopenmp"] if self._compiler_accepts("-fopenmp") else []
        flags = BASE_FLAGS + openmp
        if os.environ.get("FASTMETA_MARCH_NATIVE") == "1":
            flags = flags + ["-march=native"]
        isa_flags = X86_ISA_FLAGS if _is_x86() else {"generic": []}
        # Every (ISA, kernel file) pair is its own compiler process: run them side by side,
        # one per core, so the build takes the time of the slowest files, not their sum.
        jobs = [(isa, src) for isa in isa_flags for src in KERNEL_SOURCES]

        def compile_one(job):
            isa, src = job
            return self.compiler.compile(
                [src],
                output_dir=os.path.join(self.build_temp, isa),
                macros=[("FASTMETA_ISA", isa)],
                include_dirs=["csrc"],
                extra_postargs=flags + isa_flags[isa] + FILE_FLAGS.get(src, []),
            )

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = [obj for objs in pool.map(compile_one, jobs) for obj in objs]
        ext.extra_objects = objects
        ext.extra_compile_args = flags + [f"-DFASTMETA_HAS_{isa.upper()}=1" for isa in isa_flags]
        ext.extra_link_args = openmp
        super().build_extension(ext)


def _extensions():
    if os.environ.get("FASTMETA_NO_EXTENSIONS") == "1":
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("fastmeta._C", ["csrc/bindings.cpp"], include_dirs=["csrc"])]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
