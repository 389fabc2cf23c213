"""sitecustomize.py of tests/only_extras.write_shim (copied there): hide the modules named in
only.json beside it, as if their distributions were not installed. Stdlib only."""
import json
import os
import re
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CFG = json.loads((_HERE / "only.json").read_text())
_HIDDEN = frozenset(_CFG["hidden"])
_ALLOWED = frozenset(_CFG["allowed"])
_LOG = _HERE / "hidden.log"


def _hidden(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in _HIDDEN or ".".join(parts[:2]) in _HIDDEN


_TOLD: set = set()


def _told(name: str) -> None:
    if name in _TOLD:
        return
    _TOLD.add(name)
    try:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {name}\n")
    except OSError:
        pass


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Veto:
    """Wraps one meta path finder: a hidden module is not found by it, a distribution outside
    the allowed set is not listed by it."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            _told(name)
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._inner, "find_distributions", None)
        for dist in (find(*args, **kwargs) if find is not None else ()):
            if _canonical(dist.metadata["Name"] or "") in _ALLOWED:
                yield dist

    def invalidate_caches(self):
        inv = getattr(self._inner, "invalidate_caches", None)
        if inv is not None:
            inv()

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


_early = sorted(m for m in sys.modules if _hidden(m))
if _early:
    raise RuntimeError(f"only_extras: {_early} were imported before sitecustomize could hide them")
sys.meta_path[:] = [_Veto(f) for f in sys.meta_path]
