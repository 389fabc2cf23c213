# Sourced by scripts/demo and scripts/test: create or reuse .venv at the repo root and
# install edgeroom into it with the extras named in $EDGEROOM_EXTRAS.
# Works on a fresh Debian 12 with only python3 on it: if the venv module or a C compiler
# is missing and we are root, it installs them with apt-get; otherwise it says what to do.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

pick_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
           "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "edgeroom needs Python >= 3.11; none found on PATH" >&2
    return 1
}

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: apt-get install $*" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: please install: $* (needs root)" >&2
        return 1
    fi
}

PY="$(pick_python)"
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
        ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${ver}-venv"
    fi
    "$PY" -m venv .venv
fi
# framebus's memory fences are a small C extension (needed on aarch64, optional on x86_64).
if ! command -v cc >/dev/null 2>&1 || ! "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install gcc "python${ver}-dev" || echo "setup: continuing without the C fences (x86_64 only)" >&2
fi
# Reinstall only when the build inputs changed or these extras were never installed.
stamp=".venv/.edgeroom-installed-${EDGEROOM_EXTRAS:-core}"
want="$(cat pyproject.toml setup.py framebus/_atomic.c | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -e .venv/bin/edgeroom ]; then
    # pip, and the setuptools pyproject.toml asks for (build-system requires), so setup.py runs the same here
    .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" >/dev/null
    # setuptools tells every editable install, as a warning, that a folder named like a
    # package in the working directory would shadow it: nothing anyone here can act on.
    PYTHONWARNINGS="ignore:Editable installation" \
        .venv/bin/python -m pip install -q -e ".${EDGEROOM_EXTRAS:+[$EDGEROOM_EXTRAS]}"
    echo "$want" > "$stamp"
    echo "$want" > .venv/.edgeroom-installed-core  # any extras include the core
fi
