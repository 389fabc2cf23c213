"""Builds framebus's one C helper: memory-ordering primitives (see docs/framebus.md).

The extension is optional only on x86 (TSO): there framebus falls back to plain loads and
stores, which the hardware keeps in order. Everywhere else (aarch64: Jetson) the fences
are required and framebus refuses to import without them, so there a failed build fails
the install, with the reason, instead of an install that works until the first import.
"""
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

# The machines framebus/atomics.py has a pure-Python fallback for (keep the two sets equal).
TSO_MACHINES = frozenset({"x86_64", "amd64", "AMD64", "i386", "i686"})


def extension_optional(machine: str) -> bool:
    """May the install go on without the C fences on `machine` (platform.machine())?"""
    return machine in TSO_MACHINES


class BuildExt(build_ext):
    """Says why a required build failed and what to install, instead of a bare compiler error."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError) as exc:
            if ext.optional:
                raise  # setuptools warns and goes on
            raise BaseError(
                f"edgeroom: cannot build {ext.name}, framebus's memory fences ({exc}). They are "
                f"required on {platform.machine()} (weak memory ordering; only x86 has a pure-Python "
                "fallback). Install a C compiler and the Python headers (Debian/Ubuntu: apt-get "
                "install gcc python3-dev) and install edgeroom again."
            ) from exc


def main() -> None:
    setup(
        cmdclass={"build_ext": BuildExt},
        ext_modules=[
            Extension(
                "framebus._atomic",
                sources=["framebus/_atomic.c"],
                extra_compile_args=["-O2", "-std=c11"],
                optional=extension_optional(platform.machine()),
            )
        ],
    )


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import it
    main()
