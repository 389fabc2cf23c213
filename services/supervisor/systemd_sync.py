"""`edgeroom sources sync`: under systemd, start and stop the instance units of the sources
added or removed by command — what `edgeroom run` does for its children by itself.

The hub writes sources.json in the state directory (/var/lib/edgeroom); the path unit
`edgeroom-sources.path` sees it change and starts the oneshot `edgeroom-sources.service`,
which runs this as root (only root may start units). It compares the capture@ and decode@
instances the sources want (services/catalog.py, the same function `edgeroom run` uses)
with the instance units systemd has loaded, then starts what is missing and stops what is
no longer wanted. It also runs once at boot, after the hub, so sources added by command
come back after a reboot.
"""
from __future__ import annotations

import logging
import subprocess

from services import catalog
from services.units import unit_name

__all__ = ["plan", "sync"]

log = logging.getLogger("edgeroom.sources")



def _instance_unit(kind: str, instance: str) -> str:
    return unit_name(kind, True).replace("@", f"@{instance}")


def wanted(config) -> set[str]:
    return {_instance_unit(k, i) for k, i in catalog.instances(config) if i is not None}


def loaded(systemctl: str = "systemctl") -> set[str]:
    """Instance units systemd has running or on their way, or failed (systemd's own start limit
    decided that: sync does not override it)."""
    patterns = [_instance_unit(kind, "*") for kind, spec in catalog.specs().items() if spec.templated]
    out = subprocess.run([systemctl, "list-units", "--all", "--plain", "--no-legend", "--no-pager",
                          "--state=active,activating,reloading,failed", *patterns],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def plan(want: set[str], have: set[str]) -> tuple[list[str], list[str]]:
    """(units to start, units to stop)."""
    return sorted(want - have), sorted(have - want)


def sync(config, *, systemctl: str = "systemctl", dry_run: bool = False) -> tuple[list[str], list[str]]:
    start, stop = plan(wanted(config), loaded(systemctl))
    for verb, units in (("stop", stop), ("start", start)):
        if units:
            log.info("%s %s", verb, " ".join(units))
            if not dry_run:
                subprocess.run([systemctl, "--no-block", verb, *units], check=True, timeout=60)
    return start, stop
