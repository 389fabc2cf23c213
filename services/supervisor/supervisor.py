"""`edgeroom run`: every configured service as a child process, supervised like systemd would.

Order: stale bus segments of the prefix are removed, the hub starts and must report
READY=1, then every other service starts. A child that exits is restarted per its
`restart` policy with backoff and a start limit; one that stops pinging its watchdog is
killed (SIGABRT, then SIGKILL) and restarted. SIGINT/SIGTERM stop the services first and
the hub last (SIGTERM, SIGKILL after each one's stop_timeout), then the bus is cleaned.
SIGHUP reloads the config and passes SIGHUP on (what `systemctl reload` does).
The supervisor heartbeats the hub like any service, as `supervisor`, so its restart and
watchdog counts are on the box's scrape URL.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import framebus
from services import catalog
from services.control.endpoints import endpoints_for, hold_lock, prepare_runtime_dir, runtime_dir
from services.runtime import config as configuration
from services.runtime import logs
from services.runtime.hublink import HubLink
from services.runtime.loop import Loop
from services.runtime.metrics import Derived, new_registry, process_collector, snapshot
from services.runtime.state import state_dir
from services.supervisor.child import Child

__all__ = ["Supervisor"]

log = logging.getLogger("edgeroom.run")


class Supervisor:
    def __init__(self, config: configuration.Config, config_path: str | None = None,
                 duration: float | None = None) -> None:
        self.config, self.config_path, self.duration = config, config_path, duration
        self.rundir = prepare_runtime_dir(runtime_dir(config.box.runtime_dir))
        self._lock = hold_lock(self.rundir, "run")
        self.prefix = config.bus.prefix  # the services' prefix until they restart: what gc must clean
        self.notify_dir = self.rundir / "notify"
        self.notify_dir.mkdir(mode=0o750, exist_ok=True)
        self.loop = Loop()
        self.children: list[Child] = []
        self.shutting_down = False
        self.started = time.monotonic()
        self.link: HubLink | None = None
        self.registry = new_registry()
        self._metrics()

    def _env(self) -> dict:
        env = dict(os.environ)
        if self.config_path:
            env["EDGEROOM_CONFIG"] = str(Path(self.config_path).resolve())
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        return env

    def _metrics(self) -> None:
        self.registry.register(Derived(self._families))
        self.registry.register(process_collector(time.time()))

    def _families(self) -> list:
        restarts = CounterMetricFamily("edgeroom_supervisor_restarts", "Restarts of each unit by `edgeroom run`.",
                                       labels=["unit"])
        kills = CounterMetricFamily("edgeroom_supervisor_watchdog_kills",
                                    "Units killed for missing their watchdog pings.", labels=["unit"])
        ready = GaugeMetricFamily("edgeroom_supervisor_unit_ready", "1 while the unit is ready.", labels=["unit"])
        for c in self.children:
            restarts.add_metric([c.id], c.restarts)
            kills.add_metric([c.id], c.watchdog_kills)
            ready.add_metric([c.id], 1 if c.state == "ready" else 0)
        return [restarts, kills, ready]

    def build(self) -> None:
        self._overlay_stamp = self._overlay_mtime()
        for kind, instance in catalog.instances(self.config):
            self._add_child(kind, instance)
        self.loop.every(0.5, self._sync_sources)

    def _add_child(self, kind: str, instance: str | None) -> Child:
        settings = self.config.services[kind]
        child = Child(kind, instance, settings, self.notify_dir, self._env())
        self.children.append(child)
        self.loop.add_reader(child.notify.fileno(), lambda c=child: c.read_notify(time.monotonic()))
        return child

    # --- instances added and removed by command (`edgeroom ctl source add|remove`) -----------
    def _overlay_mtime(self) -> tuple[int, ...]:
        """When the files that decide the instances (catalog.instance_files) last changed."""
        stamps = []
        for name in catalog.instance_files():
            try:
                stamps.append((state_dir(self.config) / name).stat().st_mtime_ns)
            except OSError:
                stamps.append(0)
        return tuple(stamps)

    def _sync_sources(self) -> None:
        """Start the processes of added sources and stop those of removed ones (what
        `edgeroom sources sync` does with systemctl under systemd)."""
        stamp = self._overlay_mtime()
        if stamp == self._overlay_stamp or self.shutting_down:
            return
        self._overlay_stamp = stamp
        want = set(catalog.instances(self.config))
        have = {(c.kind, c.instance) for c in self.children if not c.retired}
        for kind, instance in sorted(want - have, key=str):
            log.info("%s@%s: wanted now (added by command or by a reloaded config); starting", kind, instance)
            self._add_child(kind, instance)
        now = time.monotonic()
        for child in self.children:
            if child.kind != "hub" and (child.kind, child.instance) not in want and not child.retired:
                log.info("%s: no longer wanted (removed by command or from the config); stopping", child.id)
                child.retired = True
                child.stop(now)

    def _drop_retired(self) -> None:
        for child in [c for c in self.children if c.retired and c.popen is None]:
            self.loop.remove_reader(child.notify.fileno())
            child.close()
            self.children.remove(child)

    @property
    def hub(self) -> Child | None:
        return next((c for c in self.children if c.kind == "hub"), None)

    # --- the loop ----------------------------------------------------------------------
    def _turn(self, now: float) -> None:
        for child in self.children:
            child.read_stderr()
            if child.reap(now, self.shutting_down or child.retired):
                continue
            child.check(now)
        self._drop_retired()
        if self.hub is not None and self.hub.state == "failed" and not self.shutting_down:
            self.shutdown("the hub failed; nothing works without it")
        if self.shutting_down:
            if all(c.popen is None for c in self.children):
                self.loop.stop()
            elif all(c.popen is None for c in self.children if c.kind != "hub") and self.hub:
                self.hub.stop(now)
            return
        self._start_due(now)
        if self.duration is not None and now - self.started > self.duration:
            self.shutdown("time is up")

    def _start_due(self, now: float) -> None:
        hub = self.hub
        hub_ready = hub is None or hub.state == "ready"
        for child in self.children:
            if child.state == "inactive" and not child.starts or child.state == "waiting" and now >= child.next_start:
                if child is hub or hub_ready:
                    child.start(now)

    def shutdown(self, why: str) -> None:
        if self.shutting_down:
            return
        log.info("stopping everything (%s)", why)
        self.shutting_down = True
        now = time.monotonic()
        for child in self.children:
            if child.kind != "hub":
                child.stop(now)
            elif child.popen is None:
                child.state = "inactive"

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload()
        else:
            self.shutdown(signal.Signals(signum).name)

    def _reload(self) -> None:
        try:
            new = configuration.load(self.config_path)
        except configuration.ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            return
        for child in self.children:
            child.settings = new.services.get(child.kind) or child.settings
            if child.popen is not None:
                child.popen.send_signal(signal.SIGHUP)
        self.config = new
        self._overlay_stamp = (-1,)  # sources added to or removed from the file start or stop now
        self._sync_sources()
        logs.setup("run", new.log.level, new.log.format)
        log.info("config reloaded; SIGHUP sent to every running service (restart policy, start limits and "
                 "timeouts apply now; watchdog_sec and nice at a service's next start; added and removed "
                 "sources start and stop now)")

    # --- the hub link ------------------------------------------------------------------
    def _heartbeat(self) -> None:
        now = time.monotonic()
        hub = self.hub
        if hub is None or hub.state != "ready":
            return
        if self.link is None:
            ep = endpoints_for(self.rundir)
            self.link = HubLink(ep, "supervisor", timeout=max(1.0, 3 * self.config.hub.heartbeat_interval))
            self.link.on_socket_change = self._swap
            self.loop.add_reader(self.link.sock, self.link.readable)
        self.link.check(now)
        state = "ready" if all(c.state == "ready" for c in self.children) else "degraded"
        self.link.request("service.heartbeat", {
            "service": "supervisor", "pid": os.getpid(), "started": time.time() - (now - self.started),
            "state": state, "status": ", ".join(f"{c.id} {c.state}" for c in self.children),
            "sessions": [], "streams": [], "metrics": snapshot(self.registry)})

    def _swap(self, old, new) -> None:
        if old is not None:
            self.loop.remove_reader(old)
        self.loop.add_reader(new, self.link.readable)

    # --- running -----------------------------------------------------------------------
    def run(self) -> int:
        logs.setup("run", self.config.log.level, self.config.log.format)
        removed = framebus.gc(self.prefix)
        if removed:
            log.info("removed %d stale bus object(s) under prefix %r", len(removed), self.prefix)
        self.build()
        if not self.children:
            log.error("nothing to run: every service is disabled in the config")
            return 1
        log.info("runtime directory %s; starting %s", self.rundir, ", ".join(c.id for c in self.children))
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.loop.on_signal(signum, self._on_signal)
        self.loop.on_signal(signal.SIGCHLD, lambda _s: None)  # wakes the loop when a child exits
        self.loop.turn_hooks.append(self._turn)
        self.loop.every(self.config.hub.heartbeat_interval, self._heartbeat)
        self.loop.every(0.1, lambda: None)  # checks (watchdog, timeouts) run at least every 100 ms
        try:
            self.loop.run()
        finally:
            self._cleanup()
        failed = [c.id for c in self.children if c.state == "failed"]
        return 1 if failed else 0

    def _cleanup(self) -> None:
        for child in self.children:
            if child.popen is not None:  # only if the loop died abnormally
                child.popen.kill()
                child.popen.wait()
            child.close()
        if self.link is not None:
            self.link.close()
        self.loop.close()
        removed = framebus.gc(self.prefix)
        log.info("all stopped%s", f"; removed {len(removed)} bus object(s)" if removed else "")
