"""The systemd units: rendered from the catalog and the config, checked by the real
systemd-analyze (verify, and security --offline with exposure <= 2.0), and consistent with
what `edgeroom run` starts."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services import catalog, units
from services.runtime import config as configuration
from services.supervisor.child import Child

REPO = Path(__file__).parent.parent
VENV_EXE = shutil.which("edgeroom", path=str(Path(__import__("sys").executable).parent)) or "edgeroom"


def rendered(tmp_path: Path, cfg: configuration.Config | None = None, exe: str = VENV_EXE) -> Path:
    units.write(units.render(cfg or configuration.defaults(), exe), tmp_path)
    return tmp_path


def test_the_committed_units_are_what_the_catalog_and_default_config_render():
    """A service registered without its unit committed in systemd/ fails here (and a stale file too)."""
    rendered_names = [u.name for u in units.render(configuration.defaults(), "/opt/edgeroom/venv/bin/edgeroom")]
    assert rendered_names == units.names()
    committed = {p.name for p in (REPO / "systemd").iterdir() if p.name != "README.md"}
    assert committed == set(rendered_names), "systemd/ differs from the catalog: `edgeroom units render --out systemd`"
    for unit in units.render(configuration.defaults(), "/opt/edgeroom/venv/bin/edgeroom"):
        committed = REPO / "systemd" / unit.name
        assert committed.exists(), f"systemd/{unit.name} missing: run `edgeroom units render --out systemd`"
        assert committed.read_text() == unit.text, f"systemd/{unit.name} drifted from the catalog: render again"


def test_every_unit_verifies_and_scores_at_most_2(tmp_path):
    results = units.check(rendered(tmp_path))
    assert {r.name for r in results} == units.checked_names()
    wanted = {"edgeroom-hub.service", "edgeroom-capture@check.service", "edgeroom-recorder.service"}
    assert wanted <= units.checked_names()
    for r in results:
        assert r.ok, f"{r.name}: {r.problem}"
        assert r.exposure <= 2.0


def test_a_broken_unit_fails_the_check(tmp_path):
    d = rendered(tmp_path)
    hub = d / "edgeroom-hub.service"
    hub.write_text(hub.read_text().replace("Type=notify", "Type=notifyy"))
    bad = {r.name: r for r in units.check(d)}["edgeroom-hub.service"]
    assert not bad.ok and "notifyy" in bad.problem
    lax = rendered(tmp_path / "lax")
    cap = lax / "edgeroom-capture@.service"
    cap.write_text("\n".join(line for line in cap.read_text().splitlines()
                             if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))))
    loose = {r.name: r for r in units.check(lax)}["edgeroom-capture@check.service"]
    assert not loose.ok and loose.exposure > 2.0 and "exposure" in loose.problem


def test_a_hub_listening_beyond_loopback_may_take_remote_peers_and_still_scores_low(tmp_path):
    cfg = configuration.loads('[hub]\nmetrics_listen = "0.0.0.0:9750"\n', env={})
    d = rendered(tmp_path, cfg)
    text = (d / "edgeroom-hub.service").read_text()
    assert "IPAddressAllow=any" in text
    assert "IPAddressAllow=localhost" in (rendered(tmp_path / "local") / "edgeroom-hub.service").read_text()
    assert all(r.ok and r.exposure <= 2.0 for r in units.check(d))


def test_device_access_is_exactly_what_each_profile_needs(tmp_path):
    hub = (rendered(tmp_path) / "edgeroom-hub.service").read_text()
    assert "PrivateDevices=yes" in hub and "DeviceAllow" not in hub and "BindPaths=/dev/shm" in hub
    capture = (tmp_path / "edgeroom-capture@.service").read_text()
    assert [line for line in capture.splitlines() if line.startswith("DeviceAllow=")] == [
        "DeviceAllow=char-video4linux rw"]
    assert "DevicePolicy=closed" in capture and "SupplementaryGroups=video" in capture
    # a GPU service (decode, vision, recorder, avatar arrive later): NVIDIA and Jetson nodes, nothing else
    gpu = catalog.ServiceSpec("decode", "x:y", "decodes", 2, instances=lambda cfg, overlay: [], devices=("gpu",))
    unit = units._service_unit(gpu, configuration.defaults(), VENV_EXE)
    allowed = [line.split("=", 1)[1] for line in unit.text.splitlines() if line.startswith("DeviceAllow=")]
    assert "char-nvidiactl rw" in allowed and "/dev/nvmap rw" in allowed and "char-video4linux rw" not in allowed
    assert "SupplementaryGroups=video render" in unit.text
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / unit.name).write_text(unit.text)
    [result] = units.check(tmp_path / "gpu")
    assert result.ok and result.exposure <= 2.0, result


def test_supervision_settings_come_from_the_config(tmp_path):
    cfg = configuration.loads("[services.capture]\nrestart = 'always'\nrestart_sec = 2.0\nwatchdog_sec = 0\n"
                              "cpu_quota = '150%'\nmemory_max = '512M'\nstart_limit_burst = 9\nstop_timeout = 7\n"
                              "[sources.cam1]\n[sources.cam2]\n", env={})
    d = rendered(tmp_path, cfg)
    capture = (d / "edgeroom-capture@.service").read_text()
    for line in ("Restart=always", "RestartSec=2s", "CPUQuota=150%", "MemoryMax=512M", "StartLimitBurst=9",
                 "TimeoutStopSec=7s", "Nice=-5", "CPUWeight=200", "RestartPreventExitStatus=78"):
        assert line in capture.splitlines(), line
    assert "WatchdogSec" not in capture
    stop_post = next(line for line in capture.splitlines() if line.startswith("ExecStopPost="))
    assert stop_post.startswith(f"ExecStopPost=-{VENV_EXE} ctl call service.exited ")  # '-': a down hub is fine
    assert '"service": "capture@%i"' in stop_post and '"result": "${SERVICE_RESULT}"' in stop_post
    assert "ExecStopPost" not in (d / "edgeroom-hub.service").read_text()  # the hub cannot report its own end
    assert "WatchdogSec=10s" in (d / "edgeroom-hub.service").read_text()
    target = (d / "edgeroom.target").read_text()
    assert "Wants=edgeroom-hub.service edgeroom-capture@cam1.service edgeroom-capture@cam2.service" in target


def test_units_start_what_edgeroom_run_starts(tmp_path):
    cfg = configuration.loads("[sources.cam1]\n", env={})
    d = rendered(tmp_path, cfg)
    for kind, instance in catalog.instances(cfg):
        spec = catalog.spec(kind)
        text = (d / units.unit_name(kind, spec.templated)).read_text()
        exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
        argv = exec_start.split("=", 1)[1].replace("%i", instance or "").split()
        child = Child(kind, instance, cfg.services[kind], tmp_path, {})
        assert argv[1:] == child.command()[3:], (argv, child.command())
        assert f"Nice={catalog.nice(spec, cfg.services[kind])}" in text
        child.close()


@pytest.mark.parametrize("kind", ["hub", "capture"])
def test_the_services_can_do_their_job_under_the_sandbox_settings(kind):
    """What the sandbox must leave: the bus (/dev/shm), the runtime dir, AF_UNIX; named, not assumed."""
    text = next(u.text for u in units.render(configuration.defaults(), VENV_EXE) if kind in u.name)
    assert "RemoveIPC=no" in text and "RuntimeDirectory=edgeroom" in text and "RuntimeDirectoryPreserve=yes" in text
    assert "AF_UNIX" in next(line for line in text.splitlines() if line.startswith("RestrictAddressFamilies="))
    assert "InaccessiblePaths=/dev/shm" not in text and "PrivateIPC" not in text
