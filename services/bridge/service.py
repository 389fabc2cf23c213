"""The bridge service, `bridge` (unit edgeroom-bridge): the sessions of a bridged room see and hear each other.

It never touches a packet of a pass-through route: it tells each session's transport what
to send (`route {session, video, audio, by: "bridge"}`), and the transport's RouteReader
does the rest (switch on a keyframe, a gate per route that holds deltas until a keyframe,
keyframe requests repeated and throttled, SPS/PPS before each IDR: services/calls/). What
it makes itself is what no stream of the bus carries yet: a transcode of a source for a
target that does not take its codec, the mix-minus audio of each target when more than
two are in a room, a grid for policy grid. docs/bridge.md has the whole story.

It learns the rooms from the hub: the session hooks on the event plane wake it at once,
and it asks for `sessions` twice a second besides (a missed event costs half a second).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import zmq

from services.bridge.metrics import BridgeMetrics
from services.bridge.plan import Names
from services.bridge.room import BridgedRoom
from services.bridge.spec import POLICIES, BridgeConfig
from services.control import protocol
from services.control.client import Subscriber
from services.control.protocol import ProtocolError
from services.runtime import keyframes
from services.runtime.service import Service
from services.runtime.state import state_dir

__all__ = ["Bridge"]

FILE = "bridge.json"            # rooms turned on/off, pins and policies set by command (the state directory)
TICK = 0.02                     # the mix's frame
REFRESH = 0.5
TOPICS = ("hook.ON_VIDEO_SESSION_STARTED", "hook.ON_VIDEO_SESSION_ENDED", "hook.ON_VIDEO_TRACK_ADDED",
          "hook.ON_VIDEO_TRACK_REMOVED")


class Bridge(Service):
    kind = "bridge"

    @property
    def cfg(self) -> BridgeConfig:
        return self.config.bridge

    def setup(self) -> None:
        self.m = BridgeMetrics(self.registry)
        self.prefix = self.config.bus.prefix
        self.names = Names()
        self.path = state_dir(self.config) / FILE
        self.commanded: dict[str, dict[str, Any]] = self._read()
        self.rooms: dict[str, BridgedRoom] = {}
        self._asking = False
        self._again = False
        self._next_tick = time.monotonic()
        self.sub = self.own(Subscriber(self.endpoints.events, list(TOPICS),
                                       max_bytes=self.config.control.max_message_bytes))
        self.loop.add_reader(self.sub.sock, self._events)
        self.on_stop(self._close_rooms, "the bridged rooms")
        self.loop.every(REFRESH, self.refresh)
        self._clock_on = False          # the 20 ms clock runs only while a room mixes or composes
        self.loop.every(1.0, self._second)
        args = {"room": str}
        self.offer("bridge.on", self.cmd_on, "bridge a room (args: room)", args=args, required=("room",))
        self.offer("bridge.off", self.cmd_off, "stop bridging a room: its sessions' routes go back to the config's "
                   "(args: room)", args=args, required=("room",))
        self.offer("bridge.status", self.cmd_status, "a bridged room: members, routes, policy, codecs, pass-through "
                   "or transcode, hook decisions, the mix (args: room; none: every bridged room)", args=args)
        self.offer("bridge.pin", self.cmd_pin, "show one session's video to the room (policy pin); session '' unpins "
                   "(args: room, session)", args={"room": str, "session": str}, required=("room", "session"))
        self.offer("bridge.policy", self.cmd_policy, "a room's video policy: speaker, pin, grid, or '' for the "
                   "config's (args: room, policy)", args={"room": str, "policy": str}, required=("room", "policy"))
        self.offer("bridge.recheck", self.cmd_recheck, "ask BEFORE_BRIDGE_VIDEO again about a room's routes (args: "
                   "room, source, target: all when left out)", args={"room": str, "source": str, "target": str},
                   required=("room",))
        self.offer_keyframes(self._keyframe)
        self.refresh()

    # ------------------------------------------------------------ which rooms
    def bridged(self, room: str) -> bool:
        said = self.commanded.get(room, {}).get("on")
        if said is not None:
            return bool(said)
        rooms = self.cfg.room_list()
        return "*" in rooms or room in rooms

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self.log.warning("ignoring %s: %s", self.path, exc)
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)} \
            if isinstance(data, dict) else {}

    def _keep(self, room: str, **changes: Any) -> None:
        entry = {**self.commanded.get(room, {}), **changes}
        self.commanded[room] = {k: v for k, v in entry.items() if v is not None}
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.commanded, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ProtocolError("unavailable", f"cannot keep the bridge's state in {self.path}: "
                                               f"{exc.strerror or exc}") from None

    # ------------------------------------------------------------ the hub's word
    def _events(self) -> None:
        woke = False
        while True:
            try:
                frames = self.sub.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                protocol.parse_event(frames, self.config.control.max_message_bytes * 2)
            except protocol.ProtocolError:
                continue
            woke = True
        if woke:
            self.refresh()

    def refresh(self) -> None:
        if self.link is None:
            return
        if self._asking:
            self._again = True
            return
        self._asking = True
        self.request("sessions", {}, self._sessions)

    def _sessions(self, result: Any, error: Exception | None) -> None:
        self._asking = False
        if error is None and isinstance(result, list):
            by_room: dict[str, list[dict[str, Any]]] = {}
            for s in result:
                if isinstance(s, dict) and isinstance(s.get("session"), str):
                    by_room.setdefault(str(s.get("room", "default")), []).append(s)
            for name, sessions in by_room.items():
                if not self.bridged(name):
                    continue
                room = self.rooms.get(name)
                if room is None:
                    room = self.rooms[name] = self._room(name)
                room.update(sessions)
            for name in [n for n in self.rooms if n not in by_room or not self.bridged(n)]:
                if not self.bridged(name):
                    self.rooms.pop(name).close()
                else:
                    self.rooms[name].update([])
            self.m.rooms.set(len(self.rooms))
        elif error is not None:
            self.throttled.warning("sessions", f"the hub did not answer `sessions`: {error}")
        if self._again:
            self._again = False
            self.refresh()

    def _room(self, name: str) -> BridgedRoom:
        room = BridgedRoom(name, self)
        said = self.commanded.get(name, {})
        room.pinned, room.policy = str(said.get("pin", "")), str(said.get("policy", ""))
        self.log.info("room %s is bridged (policy %s)", name, room.effective_policy)
        return room

    def request(self, cmd: str, args: dict[str, Any], callback: Any) -> None:
        if self.link is None or not self.link.request(cmd, args, callback):
            if self.link is None:
                callback(None, ProtocolError("unavailable", "no link to the hub"))

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.publish(topic, data)

    # ------------------------------------------------------------ media the bridge makes
    def make_picker(self) -> Any:
        from services.bridge.speaker import SpeakerPicker
        return SpeakerPicker(threshold_db=self.cfg.speaker_threshold_db, margin_db=self.cfg.speaker_margin_db,
                             hold_s=self.cfg.speaker_hold)

    def make_transcoder(self, source: str, out: str, codec: str) -> Any:
        from services.bridge.transcode import Transcoder
        t = Transcoder(source, out, codec, prefix=self.prefix, registry=self.registry, log=self.log,
                       ask_keyframe=self.request_keyframe, kbps=self.cfg.transcode_kbps, encoder=self.cfg.encoder)
        self.loop.add_reader(t.fileno(), t.pump)
        self.log.info("transcoding %s to %s as %s", source, codec, out)
        self.sessions_changed()      # the hub hears of the new stream now: keyframe requests for it find their way
        return t

    def make_grid(self, out: str, codec: str) -> Any:
        from services.bridge.grid import Grid
        w, h = (int(v) for v in self.cfg.grid_size.split("x"))
        g = Grid(out, codec, prefix=self.prefix, registry=self.registry, log=self.log,
                 ask_keyframe=self.request_keyframe, width=w, height=h, fps=self.cfg.grid_fps,
                 kbps=self.cfg.transcode_kbps, encoder=self.cfg.encoder)
        self.loop.add_reader(g.fileno(), g.pump)
        g.next_at = time.monotonic()
        self.sessions_changed()
        self._start_clock()
        return g

    def make_mixer(self, room: str) -> Any:
        from services.bridge.mixer import Mixer
        mixer = Mixer(room, prefix=self.prefix, registry=self.registry, log=self.log)
        self.loop.add_reader(mixer.fileno(), mixer.pump)
        self._start_clock()
        return mixer

    def drop_media(self, media: Any) -> None:
        self.loop.remove_reader(media.fileno())
        media.close()

    def _start_clock(self) -> None:
        if not self._clock_on:
            self._clock_on = True
            self._next_tick = time.monotonic()
            self.loop.call_later(0.0, self._tick)

    def _tick(self) -> None:
        if not any(r.mixer is not None or r.grids for r in self.rooms.values()):
            self._clock_on = False      # two-party rooms and pass-through cost the bridge no wakeups
            return
        now = time.monotonic()
        if now - self._next_tick > 1.0:         # a stall (the machine, a debugger): no burst of catch-up ticks
            self._next_tick = now
        try:
            while self._next_tick <= now:       # the mix runs on the clock, whatever the loop's jitter
                self._next_tick += TICK
                for room in list(self.rooms.values()):
                    room.tick(now)
            for room in self.rooms.values():
                for g in room.grids.values():
                    if now >= g.next_at:
                        g.next_at = max(g.next_at + 1.0 / self.cfg.grid_fps, now - 0.5)
                        g.tick()
        finally:                                # the clock goes on whatever one tick met
            self.loop.call_later(max(0.0, self._next_tick - time.monotonic()), self._tick)

    def _second(self) -> None:
        """A quiet source's transcode notices its producer died, and says its rate (pump does it while items flow)."""
        for room in self.rooms.values():
            for t in room.transcoders.values():
                t.tick()

    def _keyframe(self, stream: str, reason: str) -> dict[str, Any]:
        for room in self.rooms.values():
            answer = room.keyframe(stream, reason)
            if answer is not None:
                return answer
        return keyframes.cannot(f"the bridge does not make {stream} (any more)")

    def _close_rooms(self) -> None:
        for room in list(self.rooms.values()):
            room.close(release=False)
        self.rooms.clear()

    # ------------------------------------------------------------ commands
    def _known(self, room: str) -> BridgedRoom:
        found = self.rooms.get(room)
        if found is None:
            raise ProtocolError("not_found", f"room {room!r} is not bridged (bridged: "
                                             f"{', '.join(sorted(self.rooms)) or 'none'}; `edgeroom ctl bridge on "
                                             f"{room}`)")
        return found

    def cmd_on(self, args: dict[str, Any]) -> dict[str, Any]:
        self._keep(args["room"], on=True)
        self.refresh()
        return {"room": args["room"], "bridged": True}

    def cmd_off(self, args: dict[str, Any]) -> dict[str, Any]:
        self._keep(args["room"], on=False)
        room = self.rooms.pop(args["room"], None)
        if room is not None:
            room.close()
        self.m.rooms.set(len(self.rooms))
        return {"room": args["room"], "bridged": False}

    def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("room"):
            return self._known(args["room"]).status()
        return {"rooms": [r.status() for r in self.rooms.values()], "policy": self.cfg.policy,
                "config_rooms": self.cfg.room_list()}

    def cmd_pin(self, args: dict[str, Any]) -> dict[str, Any]:
        room = self._known(args["room"])
        session = args["session"]
        if session and session not in {m.id for m in room.members}:
            raise ProtocolError("not_found", f"no session {session!r} in room {room.name} (its sessions: "
                                             f"{', '.join(m.id for m in room.members) or 'none'})")
        self._keep(room.name, pin=session or None)
        room.pinned = session
        room.apply()
        return room.status()

    def cmd_policy(self, args: dict[str, Any]) -> dict[str, Any]:
        room = self._known(args["room"])
        policy = args["policy"]
        if policy and policy not in POLICIES:
            raise ProtocolError("bad_args", f"policy must be one of {', '.join(POLICIES)} (or '' for the config's), "
                                            f"got {policy!r}")
        self._keep(room.name, policy=policy or None)
        room.policy = policy
        room.apply()
        return room.status()

    def cmd_recheck(self, args: dict[str, Any]) -> dict[str, Any]:
        room = self._known(args["room"])
        return {"room": room.name, "asked": room.recheck(args.get("source", ""), args.get("target", ""))}

    # ------------------------------------------------------------ reload, status
    def apply(self, new: Any, changes: list[Any]) -> list[str]:
        pending = [c.key for c in changes if not c.live]
        self.config = new
        for room in self.rooms.values():
            room.picker = self.make_picker()
            room.apply()
        self.refresh()
        return pending

    def describe(self) -> dict[str, Any]:
        parts = [f"{name}: {len(r.members) - len(r.refused)} bridged ({r.effective_policy})"
                 for name, r in sorted(self.rooms.items())]
        return {"status": ("; ".join(parts) or "no room bridged")[:200],
                "streams": [t.out for r in self.rooms.values() for t in r.transcoders.values()]
                + [g.out for r in self.rooms.values() for g in r.grids.values()]
                + ([f"mix-{t}-audio" for r in self.rooms.values() if r.mixer is not None for t, slot in r.routes
                    if slot == 1])}
