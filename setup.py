"""Builds framebus's one C helper: memory-ordering primitives (see docs/framebus.md).

The extension is optional: on x86_64 framebus falls back to plain loads and stores,
which are ordered by the hardware (TSO). On aarch64 the fences are required, and
framebus refuses to run without them rather than risk a torn frame.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "framebus._atomic",
            sources=["framebus/_atomic.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        )
    ]
)
