"""systemd units for the box, rendered from the catalog and the config.

The catalog (services/catalog.py) says what runs and what each service needs (devices,
network, priority); the config says how it is supervised ([services.KIND]: restart,
timeouts, watchdog, nice, cpu_quota, memory_max) and which instances exist (sources).
`edgeroom run` reads the same two, so a box behaves the same under either.

Every unit is hardened to a `systemd-analyze security` exposure of at most 2.0 with
exactly the access its service needs: AF_UNIX always (the hub's sockets), IP only where
the service talks to the network, /dev/shm always (the bus), video devices for capture,
GPU devices for the GPU services. What each directive is for is in docs/systemd.md.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services import catalog
from services.runtime import config as configuration

__all__ = ["Unit", "Checked", "render", "write", "check", "checked_names", "names", "unit_name", "TARGET"]

TARGET = "edgeroom.target"
USER = "edgeroom"
CONFIG_PATH = "/etc/edgeroom/edgeroom.toml"
STATE_PATH = "/var/lib/edgeroom"  # StateDirectory=edgeroom
SOURCES_PATH, SOURCES_SYNC = "edgeroom-sources.path", "edgeroom-sources.service"
HUB_UNIT = "edgeroom-hub.service"  # the unit every other one wants and comes after

# Device nodes each profile may open (DeviceAllow= patterns, read-write).
DEVICES = {
    "video": ["char-video4linux"],                                  # V4L2 webcams: /dev/video*
    "gpu": ["char-nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps",   # x86 NVIDIA
            "char-drm", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu",          # DRI, Jetson
            "/dev/nvhost-as-gpu", "/dev/nvhost-nvdec", "/dev/nvhost-msenc", "/dev/nvmap"],
}
GROUPS = {"video": ["video"], "gpu": ["video", "render"]}

HARDENING = """\
UMask=0007
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @obsolete
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=
KeyringMode=private
"""


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


def unit_name(kind: str, templated: bool) -> str:
    return f"edgeroom-{kind}{'@' if templated else ''}.service"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _network(spec: catalog.ServiceSpec, cfg: configuration.Config) -> list[str]:
    """IP access: none, loopback only, or any (the service talks to cameras or remote clients)."""
    network = spec.network_of(cfg)
    if network == "none":
        return ["RestrictAddressFamilies=AF_UNIX", "PrivateNetwork=yes"]
    lines = ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "IPAddressDeny=any"]
    return lines + ["IPAddressAllow=any" if network == "any" else "IPAddressAllow=localhost"]


def _devices(spec: catalog.ServiceSpec) -> list[str]:
    """The bus's /dev/shm always; video or GPU nodes where the service needs them, nothing else."""
    if not spec.devices:
        return ["PrivateDevices=yes", "BindPaths=/dev/shm", "MemoryDenyWriteExecute=yes", "PrivateUsers=yes"]
    lines = ["PrivateDevices=no", "DevicePolicy=closed"]
    groups: list[str] = []
    for profile in spec.devices:
        lines += [f"DeviceAllow={node} rw" for node in DEVICES[profile]]
        groups += [g for g in GROUPS[profile] if g not in groups]
    lines.append(f"SupplementaryGroups={' '.join(groups)}")
    if "gpu" in spec.devices:
        return lines  # the CUDA driver JIT-compiles kernels: it needs W+X memory
    return lines + ["MemoryDenyWriteExecute=yes"]  # no PrivateUsers: device access goes by the real groups


def _writable(spec: catalog.ServiceSpec, cfg: configuration.Config) -> list[str]:
    """A service that writes outside the state directory (the recorder's recordings) may write there;
    anything else on the system stays read-only."""
    where = spec.writes(cfg) if spec.writes else ""
    if not where or where.rstrip("/") == STATE_PATH or where.startswith(STATE_PATH + "/"):
        return []  # StateDirectory= makes /var/lib/edgeroom writable already
    return [f"ReadWritePaths={where}"]


def _limits(svc: configuration.ServiceConfig, spec: catalog.ServiceSpec) -> list[str]:
    lines = [f"Nice={catalog.nice(spec, svc)}", f"CPUWeight={spec.cpu_weight}"]
    if svc.cpu_quota:
        lines.append(f"CPUQuota={svc.cpu_quota}")
    if svc.memory_max:
        lines.append(f"MemoryMax={svc.memory_max}")
    return lines


def _unit_section(spec: catalog.ServiceSpec, svc: configuration.ServiceConfig) -> str:
    name = f"{spec.kind} %i" if spec.templated else spec.kind
    after_hub = [] if unit_name(spec.kind, False) == HUB_UNIT else [f"Wants={HUB_UNIT}", f"After={HUB_UNIT}"]
    lines = [f"Description=edgeroom {name}: {spec.summary}", f"PartOf={TARGET}", *after_hub,
             f"StartLimitIntervalSec={_seconds(svc.start_limit_interval)}", f"StartLimitBurst={svc.start_limit_burst}"]
    return "[Unit]\n" + "\n".join(lines) + "\n"


def _service_section(spec: catalog.ServiceSpec, svc: configuration.ServiceConfig, exe: str,
                     cfg: configuration.Config) -> str:
    instance = " %i" if spec.templated else ""
    lines = ["Type=notify", "NotifyAccess=main",
             f"ExecStart={exe} service {spec.kind}{instance}",
             "ExecReload=/bin/kill -HUP $MAINPID",
             f"Restart={svc.restart}", f"RestartSec={_seconds(svc.restart_sec)}",
             "RestartPreventExitStatus=78",
             f"TimeoutStartSec={_seconds(svc.start_timeout)}", f"TimeoutStopSec={_seconds(svc.stop_timeout)}"]
    if svc.watchdog_sec:
        lines.append(f"WatchdogSec={_seconds(svc.watchdog_sec)}")
    if spec.reports_exit:  # tell the hub how the process ended: watchdog kills, crashes, signals, on the scrape URL
        sid = f"{spec.kind}@%i" if spec.templated else spec.kind
        lines.append(f"ExecStopPost=-{exe} ctl call service.exited '{{\"service\": \"{sid}\", "
                     f"\"result\": \"${{SERVICE_RESULT}}\", \"code\": \"${{EXIT_CODE}}\", "
                     f"\"status\": \"${{EXIT_STATUS}}\"}}'")
    lines += [f"User={USER}", f"Group={USER}", f"Environment=EDGEROOM_CONFIG={CONFIG_PATH}",
              "RuntimeDirectory=edgeroom", "RuntimeDirectoryMode=0750", "RuntimeDirectoryPreserve=yes",
              "StateDirectory=edgeroom", "StateDirectoryMode=0750",
              "RemoveIPC=no"]
    lines += _limits(svc, spec) + _network(spec, cfg) + _devices(spec) + _writable(spec, cfg)
    return "[Service]\n" + "\n".join(lines) + "\n" + HARDENING


def _service_unit(spec: catalog.ServiceSpec, cfg: configuration.Config, exe: str) -> Unit:
    svc = cfg.services[spec.kind]
    text = (f"# Rendered by `edgeroom units render` from services/catalog.py and the config; do not edit:\n"
            f"# change the config ([services.{spec.kind}]) and render again. Directives: docs/systemd.md.\n"
            + _unit_section(spec, svc) + "\n" + _service_section(spec, svc, exe, cfg)
            + f"\n[Install]\nWantedBy={TARGET}\n")
    return Unit(unit_name(spec.kind, spec.templated), text)


def _target(cfg: configuration.Config) -> Unit:
    wants = [unit_name(k, False) if i is None else unit_name(k, True).replace("@", f"@{i}")
             for k, i in catalog.instances(cfg, with_overlay=False)] + [SOURCES_PATH, SOURCES_SYNC]
    text = ("# Rendered by `edgeroom units render`: the box's services, as the config asks for them.\n"
            "[Unit]\nDescription=edgeroom: real-time video rooms on this box\n"
            f"Wants={' '.join(wants)}\nAfter=network-online.target\n\n"
            "[Install]\nWantedBy=multi-user.target\n")
    return Unit(TARGET, text)


def _sources_units(exe: str) -> list[Unit]:
    """The path unit that watches sources.json and the oneshot that starts and stops instance
    units to match it (services/supervisor/systemd_sync.py). Root, because only root may start
    units, but with nothing else: no network, no devices, no capabilities (so it reads
    sources.json through the edgeroom group, like any member), a read-only system. Not
    StateDirectory=: for a root unit systemd would chown the directory to root, and the hub
    could no longer write it."""
    head = "# Rendered by `edgeroom units render`: sources added or removed by `edgeroom ctl source`.\n"
    watched = "".join(f"PathChanged={STATE_PATH}/{name}\n" for name in catalog.instance_files())
    path = (head + "[Unit]\nDescription=edgeroom: watch the sources added and removed by command\n"
            f"PartOf={TARGET}\n\n[Path]\n{watched}Unit={SOURCES_SYNC}\n\n[Install]\nWantedBy={TARGET}\n")
    service = (head + "[Unit]\nDescription=edgeroom: start and stop capture and decode units to match the sources\n"
               f"PartOf={TARGET}\nAfter=edgeroom-hub.service\n\n[Service]\nType=oneshot\n"
               f"ExecStart={exe} sources sync\nEnvironment=EDGEROOM_CONFIG={CONFIG_PATH}\n"
               f"Environment=STATE_DIRECTORY={STATE_PATH}\nSupplementaryGroups=edgeroom\n"
               "TimeoutStartSec=90s\n"
               "RestrictAddressFamilies=AF_UNIX\nPrivateNetwork=yes\nPrivateDevices=yes\nIPAddressDeny=any\n"
               "ProtectHome=yes\nMemoryDenyWriteExecute=yes\nPrivateUsers=no\n" + HARDENING +
               f"\n[Install]\nWantedBy={TARGET}\n")
    return [Unit(SOURCES_PATH, path), Unit(SOURCES_SYNC, service)]


def render(cfg: configuration.Config, exe: str) -> list[Unit]:
    """Every unit of the box: the target, one unit (or template) per catalog service, and the
    two units that follow the sources added or removed by command."""
    return ([_target(cfg)] + [_service_unit(spec, cfg, exe) for spec in catalog.specs().values()]
            + _sources_units(exe))


def names() -> list[str]:
    """The file names of every unit `render` makes: the target, one per service (a template for a
    templated one), and the two that follow the sources added by command."""
    return [TARGET, *(unit_name(kind, spec.templated) for kind, spec in catalog.specs().items()),
            SOURCES_PATH, SOURCES_SYNC]


def checked_names() -> set[str]:
    """What `check` reports on: every unit but the path unit, templates as their `check` instance."""
    return {name.replace("@.", "@check.") for name in names() if not name.endswith(".path")}


def write(units: list[Unit], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for unit in units:
        path = out / unit.name
        path.write_text(unit.text)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Checked:
    name: str
    exposure: float
    ok: bool
    problem: str = ""


def _analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        raise FileNotFoundError("systemd-analyze not found: install the Debian package `systemd`")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def _instance_copies(directory: Path, scratch: Path) -> list[Path]:
    """Templates cannot be analysed as such: check each as an instance named `check`."""
    out = []
    for path in sorted(directory.glob("edgeroom*")):
        if path.suffix in (".service", ".target"):
            copy = scratch / path.name.replace("@.", "@check.")
            copy.write_text(path.read_text())
            out.append(copy)
    return out


def check(directory: Path, root: str | None = None, limit: float = 2.0) -> list[Checked]:
    """`systemd-analyze verify` on every unit, and `security --offline` on every service unit."""
    with tempfile.TemporaryDirectory(prefix="edgeroom-units-") as tmp:
        paths = _instance_copies(directory, Path(tmp))
        verify = _analyze("verify", *([f"--root={root}"] if root else []), *map(str, paths))
        problems = {p.name: line for p in paths for line in (verify.stderr + verify.stdout).splitlines()
                    if p.name in line or p.name.replace("@check.", "@.") in line}
        results = [Checked(p.name, 0.0, p.name not in problems, problems.get(p.name, ""))
                   for p in paths if p.suffix == ".target"]
        for path in (p for p in paths if p.suffix == ".service"):
            out = _analyze("security", "--offline=yes", str(path))
            match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
            exposure = float(match.group(1)) if match else 10.0
            problem = problems.get(path.name, "") or ("" if verify.returncode == 0 else verify.stderr.strip())
            if exposure > limit:
                problem = f"exposure {exposure} is over {limit}" + (f"; {problem}" if problem else "")
            results.append(Checked(path.name, exposure, not problem, problem))
    return results
