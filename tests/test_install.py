"""scripts/install.sh, run for real into scratch roots: the plan it prints, every file it lays
down, a second run that changes nothing, an edited config that survives, uninstall and purge.

One install (core only, so pip is quick) is shared by the tests that only read it; the tests
that change a root work on a `cp -a` copy of it (the installer makes a scratch root's venv
relocatable, so a copy runs its own venv).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services import units
from services.runtime import config as configuration

REPO = Path(__file__).parent.parent
SCRIPT = REPO / "scripts" / "install.sh"
CORE = ["--extras", "none", "--platform", "cpu"]
PREFIX = "/opt/edgeroom"
EXE = f"{PREFIX}/venv/bin/edgeroom"
UNITS = set(units.names())  # derived from the catalog: a new service's unit is expected at once
WANTS = "etc/systemd/system/multi-user.target.wants/edgeroom.target"
# systemd-sysusers and userdel write these into a fresh root: its account database
ACCOUNT_DB = {"passwd", "group", "shadow", "gshadow", ".pwd.lock", "passwd-", "group-", "shadow-", "gshadow-"}
STEPS = {"cpu": "media,vision,ai,webrtc,screen,mcp", "nvidia": "media,vision-gpu,ai,webrtc,screen,mcp",
         "jetson": "media,ai,webrtc,screen,mcp"}

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("systemd-sysusers", "systemctl", "systemd-analyze")),
    reason="a real install needs root and systemd's tools (systemd-sysusers, systemctl, systemd-analyze)")


def run_install(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    proc = subprocess.run(["bash", str(SCRIPT), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    if ok:
        assert proc.returncode == 0, f"install.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_root(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def expected_platform() -> str:
    """What the installer should detect here, from the same evidence it is told to read."""
    model = Path("/proc/device-tree/model")
    if Path("/etc/nv_tegra_release").exists() or (model.exists() and b"Jetson" in model.read_bytes()):
        return "jetson"
    if os.uname().machine == "x86_64":
        smi = shutil.which("nvidia-smi")
        if (Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()
                or (smi and subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0)):
            return "nvidia"
    return "cpu"


def tree(root: Path) -> set[str]:
    """Every path under root as seen inside it, directories ending in /; the venv is one entry."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        here = "" if rel == "." else "/" + rel
        if here == f"{PREFIX}/venv":
            dirnames[:] = []
            continue
        out |= {f"{here}/{d}/" for d in dirnames} | {f"{here}/{f}" for f in filenames}
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Type, mode, owner, mtime and content hash (or link target) of everything but __pycache__."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in [*dirnames, *filenames, ""]:
            path = Path(dirpath, name) if name else Path(dirpath)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = ""
            snap[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what)
    return snap


def account(root: Path, name: str = "edgeroom") -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(passwd entries, group entries) of the root, by name."""
    def read(f: str) -> dict[str, list[str]]:
        p = root / "etc" / f
        return {line.split(":")[0]: line.split(":") for line in p.read_text().splitlines()} if p.exists() else {}
    return read("passwd"), read("group")


def manifest(root: Path, at: str = f"{PREFIX}/install-manifest.txt") -> set[str]:
    lines = (root / at.lstrip("/")).read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


def shipped_config() -> str:
    sample = (REPO / "config" / "edgeroom.toml").read_text()
    assert sample.count('\nruntime_dir = ""\n') == 1
    return sample.replace('\nruntime_dir = ""\n', '\nruntime_dir = "/run/edgeroom"\n')


@contextmanager
def with_os_files(root: Path) -> Iterator[None]:
    """What a real root has and a scratch root lacks, for `systemd-analyze verify --root`: systemd's
    own units (sysinit.target, ...) and /bin/kill (the units' ExecReload). Removed afterwards."""
    added = [root / "usr/lib/systemd", root / "bin"]
    assert not any(p.exists() for p in added)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy2(shutil.which("kill", path="/usr/bin:/bin"), root / "bin" / "kill")
    try:
        yield
    finally:
        for p in added:
            shutil.rmtree(p)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, str]:
    """One real install, core only, into a scratch root; tests that use it only read it."""
    if os.geteuid() != 0:
        pytest.skip("a real install needs root")
    root = tmp_path_factory.mktemp("install") / "root"
    root.mkdir()
    proc = run_install(root, *CORE)
    return root, proc.stdout


# --- the plan -------------------------------------------------------------------------------------


def test_a_dry_run_changes_nothing_and_prints_the_plan(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    out = run_install(root, "--dry-run").stdout
    assert list(root.iterdir()) == [], "a dry run wrote into the root"
    assert not (tmp_path / "fresh").exists()
    platform = expected_platform()
    assert f"install: platform: {platform} (detected)" in out
    assert f"install: extras: {STEPS[platform]} (for {platform})" in out
    if platform == "cpu":   # this build machine: no Jetson, no NVIDIA GPU
        assert "install: NVIDIA GPU: none" in out
        assert "install: extras: media,vision,ai,webrtc,screen,mcp (for cpu)" in out
    for needle in ("install: architecture: ", "install: distribution: ", "install: python: ", "install: plan: ",
                   f"systemd-sysusers --root {root} {root}/usr/lib/sysusers.d/edgeroom.conf",
                   f'pip install "{REPO}[{STEPS[platform]}]" into {root}{PREFIX}/venv',
                   f"write {root}/etc/edgeroom/edgeroom.toml (mode 0640",
                   f"create {root}/var/lib/edgeroom (mode 0750",
                   f"units render --config {root}/etc/edgeroom/edgeroom.toml --exec {EXE}",
                   f"systemctl --root {root} enable edgeroom.target",
                   f"write {root}{PREFIX}/install-manifest.txt",
                   "systemctl start edgeroom.target", "journalctl -u 'edgeroom-*' -f", "edgeroom ctl status",
                   "http://127.0.0.1:9750/metrics", "install: dry run over: nothing was changed"):
        assert needle in out, f"{needle!r} not in the plan:\n{out}"
    assert all(f"step {n}/6" in out for n in range(1, 7))
    # a root that does not exist yet is not made either
    run_install(tmp_path / "fresh", "--dry-run", *CORE)
    assert not (tmp_path / "fresh").exists()


def test_overrides_are_reported_and_bad_options_refused(tmp_path):
    detected = expected_platform()
    out = run_install(tmp_path, "--dry-run", "--platform", "nvidia").stdout
    assert f"install: platform: nvidia (from --platform; detected: {detected})" in out
    assert "install: extras: media,vision-gpu,ai,webrtc,screen,mcp (for nvidia)" in out and \
        "[media,vision-gpu,ai,webrtc,screen,mcp]" in out
    out = run_install(tmp_path, "--dry-run", "--platform", "jetson").stdout
    assert "install: extras: media,ai,webrtc,screen,mcp (for jetson)" in out
    assert "onnxruntime-gpu" in out and "https://pypi.jetson-ai-lab.io/jp6/cu126" in out
    out = run_install(tmp_path, "--dry-run", "--extras", "none", "--no-enable").stdout
    assert "install: extras: none (core only) (from --extras)" in out and f'pip install "{REPO}" into' in out
    assert "not enabling edgeroom.target (--no-enable)" in out and "enable edgeroom.target (" not in out
    for bad, says in ((["--purge"], "--purge goes with --uninstall"), (["--platform", "arm"], "--platform must be"),
                      (["--extras", "media,nope"], "unknown extra nope"), (["--frobnicate"], "unknown option")):
        proc = run_install(tmp_path, "--dry-run", *bad, ok=False)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True).stdout.startswith("usage:")


# --- what a real install lays down ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_venv_is_a_real_install_that_runs_on_the_installed_config(installed):
    root, out = installed
    assert "install: platform: cpu (from --platform" in out and "install: extras: none (core only)" in out
    exe = root / EXE.lstrip("/")
    conf = root / "etc/edgeroom/edgeroom.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROOM_")}
    check = subprocess.run([exe, "config", "check", conf], capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 0 and check.stdout.startswith(f"ok: {conf}"), check.stdout + check.stderr
    effective = json.loads(subprocess.run([exe, "config", "check", conf, "--json"], capture_output=True, text=True,
                                          env=env, check=True, timeout=60).stdout)
    assert effective["box"]["runtime_dir"] == "/run/edgeroom"
    where = subprocess.run([root / "opt/edgeroom/venv/bin/python", "-c", "import services; print(services.__file__)"],
                           capture_output=True, text=True, check=True, timeout=60, cwd=root, env=env).stdout
    assert where.startswith(f"{root}{PREFIX}/venv/lib/"), f"not a copy in the venv (editable?): {where}"


@pytest.mark.slow
def test_config_state_dir_and_account(installed):
    root, _ = installed
    passwd, group = account(root)
    assert passwd["edgeroom"][5:] == ["/var/lib/edgeroom", "/usr/sbin/nologin"]
    uid, gid = int(passwd["edgeroom"][2]), int(group["edgeroom"][2])
    assert int(passwd["edgeroom"][3]) == gid
    for extra in ("video", "render"):
        assert "edgeroom" in group[extra][3].split(","), f"edgeroom is not in {extra}: {group[extra]}"
    assert (root / "usr/lib/sysusers.d/edgeroom.conf").read_text() == \
        (REPO / "packaging/sysusers.d/edgeroom.conf").read_text()

    conf = root / "etc/edgeroom/edgeroom.toml"
    assert conf.read_text() == shipped_config()
    st = conf.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, gid)
    st = (root / "etc/edgeroom").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, gid)
    st = (root / "var/lib/edgeroom").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, uid, gid)


@pytest.mark.slow
def test_the_units_are_rendered_for_the_path_inside_the_root_and_enabled(installed):
    root, _ = installed
    unitdir = root / "etc/systemd/system"
    assert {p.name for p in unitdir.iterdir() if p.is_file()} == UNITS
    cfg = configuration.load(root / "etc/edgeroom/edgeroom.toml", env={})
    for unit in units.render(cfg, EXE):
        assert (unitdir / unit.name).read_text() == unit.text
    for name in UNITS - {"edgeroom.target", "edgeroom-sources.path"}:
        [start] = [line for line in (unitdir / name).read_text().splitlines() if line.startswith("ExecStart=")]
        assert start.startswith(f"ExecStart={EXE} sources sync" if "sources" in name
                                else f"ExecStart={EXE} service ")
    link = root / WANTS
    assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/edgeroom.target"


@pytest.mark.slow
def test_the_units_pass_the_check_against_the_root(installed):
    root, _ = installed
    with with_os_files(root):
        proc = subprocess.run([root / EXE.lstrip("/"), "units", "check", root / "etc/systemd/system", "--root", root],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exposures = {line.split()[0]: float(line.split()[2]) for line in proc.stdout.splitlines()}
    assert set(exposures) == units.checked_names()
    assert all(e <= 2.0 for e in exposures.values()), exposures


@pytest.mark.slow
def test_no_scratch_root_path_leaks_into_any_file(installed):
    root, _ = installed
    needle = str(root).encode()
    leaked = [str(p) for p in root.rglob("*")
              if p.is_file() and not p.is_symlink() and p.suffix != ".pyc" and needle in p.read_bytes()]
    assert leaked == [], f"the scratch root's path is written into {leaked[:10]}"
    first = (root / EXE.lstrip("/")).read_text().splitlines()[0]
    assert first == "#!/bin/sh", f"the venv's scripts should find python beside them, not at {first}"


@pytest.mark.slow
def test_the_manifest_lists_exactly_what_is_there_outside_the_venv(installed):
    root, _ = installed
    listed = manifest(root)
    assert listed == tree(root), f"missing: {tree(root) - listed}; extra: {listed - tree(root)}"
    for path in ("/etc/edgeroom/edgeroom.toml", "/var/lib/edgeroom/", f"{PREFIX}/venv/", "/" + WANTS,
                 "/usr/lib/sysusers.d/edgeroom.conf", *(f"/etc/systemd/system/{u}" for u in UNITS)):
        assert path in listed


# --- running it again, uninstalling ---------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_changes_nothing_and_an_edited_config_survives(installed, tmp_path):
    root = copy_root(installed[0], tmp_path / "root")
    before = snapshot(root)
    out = run_install(root, *CORE).stdout
    assert "no pip install" in out and "is up to date" in out
    assert "install: write " not in out and "install: create " not in out and "install: set " not in out
    after = snapshot(root)
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                             if before.get(k) != after.get(k)}

    conf = root / "etc/edgeroom/edgeroom.toml"
    edited = conf.read_text().replace('name = "edgeroom"', 'name = "lobby-box"', 1)
    conf.write_text(edited)
    out = run_install(root, *CORE).stdout
    assert "differs from the shipped config: keeping it" in out
    assert conf.read_text() == edited
    new = root / "etc/edgeroom/edgeroom.toml.new"
    assert new.read_text() == shipped_config() and stat.S_IMODE(new.stat().st_mode) == 0o640
    assert "/etc/edgeroom/edgeroom.toml.new" in manifest(root) and manifest(root) == tree(root)
    settled = snapshot(root)
    run_install(root, *CORE)
    assert snapshot(root) == settled


@pytest.mark.slow
def test_uninstall_keeps_config_and_state_then_purge_removes_the_rest(installed, tmp_path):
    root = copy_root(installed[0], tmp_path / "root")
    before = snapshot(root)
    run_install(root, "--uninstall", "--purge", "--dry-run")
    assert snapshot(root) == before

    run_install(root, "--uninstall")
    assert not (root / "opt").exists() and not (root / "usr").exists()
    assert not (root / WANTS).exists() and not (root / "etc/systemd").exists()
    assert (root / "etc/edgeroom/edgeroom.toml").read_text() == shipped_config()
    assert (root / "var/lib/edgeroom").is_dir()
    assert "edgeroom" in account(root)[0]
    run_install(root, "--uninstall")   # twice is fine
    kept = manifest(root, "/etc/edgeroom/install-manifest.txt")
    assert kept == tree(root), "the uninstall's record of what it kept is not what is there"

    # installing again over the kept config: everything is back and the manifest is whole again
    conf = root / "etc/edgeroom/edgeroom.toml"
    conf.write_text(conf.read_text().replace('level = "info"', 'level = "debug"', 1))
    run_install(root, *CORE)
    assert 'level = "debug"' in conf.read_text() and (root / "etc/edgeroom/edgeroom.toml.new").exists()
    assert not (root / "etc/edgeroom/install-manifest.txt").exists()
    assert manifest(root) == tree(root) and (root / WANTS).is_symlink()

    run_install(root, "--uninstall")
    run_install(root, "--uninstall", "--purge")
    assert_purged(root)


@pytest.mark.slow
def test_purge_straight_after_install_removes_everything_it_created(installed, tmp_path):
    root = copy_root(installed[0], tmp_path / "root")
    run_install(root, "--uninstall", "--purge")
    assert_purged(root)


def assert_purged(root: Path) -> None:
    left = tree(root)
    assert left <= {"/etc/"} | {f"/etc/{f}" for f in ACCOUNT_DB}, f"left behind: {left}"
    passwd, group = account(root)
    assert "edgeroom" not in passwd and "edgeroom" not in group
    assert not any("edgeroom" in g[3].split(",") for g in group.values())
