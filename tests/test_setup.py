"""setup.py's rule for framebus's C fences: optional on x86 (TSO), required everywhere else.

The rule is checked by name, and by real builds with no working compiler (CC points
nowhere) on this machine, posing as each kind of machine: an install on aarch64 must fail
there, saying why, not succeed and leave a box that breaks at the first `import framebus`.
"""
from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from framebus import atomics

REPO = Path(__file__).parent.parent
SETUP = runpy.run_path(str(REPO / "setup.py"), run_name="edgeroom_setup")  # defines, builds nothing


@pytest.mark.parametrize("machine, optional", [
    ("x86_64", True), ("AMD64", True), ("i686", True),
    ("aarch64", False), ("arm64", False), ("armv7l", False), ("riscv64", False), ("ppc64le", False),
])
def test_extension_is_optional_only_where_framebus_has_a_pure_fallback(machine, optional):
    assert SETUP["extension_optional"](machine) is optional


def test_setup_and_framebus_agree_on_the_tso_machines():
    assert SETUP["TSO_MACHINES"] == atomics.TSO_MACHINES


def build_without_compiler(tmp_path: Path, machine: str) -> subprocess.CompletedProcess:
    """`setup.py build_ext` of a copy of the sources, as if on `machine`, with CC missing."""
    src = tmp_path / "src"
    (src / "framebus").mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md", "framebus/_atomic.c"):
        shutil.copy(REPO / name, src / name)
    code = ("import platform, runpy, sys; "
            f"platform.machine = lambda: {machine!r}; "
            "sys.argv = ['setup.py', 'build_ext', '--build-lib', 'out', '--build-temp', 'tmp']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "CC": str(tmp_path / "no-cc")})


def test_aarch64_build_without_a_compiler_fails_and_says_why(tmp_path):
    r = build_without_compiler(tmp_path, "aarch64")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "cannot build framebus._atomic" in r.stderr, r.stderr
    assert "required on aarch64" in r.stderr and "apt-get install gcc python3-dev" in r.stderr, r.stderr
    assert not list((tmp_path / "src").rglob("_atomic*.so"))


def test_x86_64_build_without_a_compiler_goes_on_without_the_extension(tmp_path):
    r = build_without_compiler(tmp_path, "x86_64")
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'building extension "framebus._atomic" failed' in r.stdout + r.stderr
    assert not list((tmp_path / "src").rglob("_atomic*.so"))
