"""One bridged room: its members, the routes the bridge keeps for them, and the media it makes.

`update(sessions)` takes the hub's sessions of the room (on every change the hub reports,
and twice a second); `apply()` plans the routes (plan.py), passes each video route through
BEFORE_BRIDGE_VIDEO (hookgate.py), starts and stops what the routes need (a transcode per
source and codec, a mix-minus per target when more than two are in the room, a grid per
target for policy grid) and sends the transports the routes that changed (`route` with
`by: "bridge"`). `tick()` runs every 20 ms: the mix, the levels, the active speaker.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from services.bridge.hookgate import Decision, HookGate
from services.bridge.plan import Member, Route, bridged, plan

__all__ = ["BridgedRoom", "members_of"]

Key = tuple[str, int]          # (target session, video slot)


def members_of(sessions: list[dict[str, Any]]) -> list[Member]:
    """The members among a room's sessions (the hub's `sessions`): those with media in, or send tracks."""
    out = []
    for s in sessions:
        recv = [t for t in s.get("tracks", []) if t.get("direction", "recv") == "recv"]
        video = next((t for t in recv if t.get("kind") == "video"), None)
        audio = next((t for t in recv if t.get("kind") == "audio"), None)
        accepts = s.get("accepts")
        codecs = tuple(accepts.get("video", [])) if isinstance(accepts, dict) else None
        v_stream, v_codec = (video["stream"], str(video.get("format", ""))) if video else ("", "")
        a_stream = audio["stream"] if audio else ""
        if s.get("kind") == "call" and codecs is not None:
            # a call's media are named after it (services/calls/): routed before its first packet arrives,
            # so the others see it as soon as it sends; its codec is the one agreed both ways
            if not video and len(codecs) == 1:
                v_stream, v_codec = s["session"], codecs[0]
            if not audio:
                a_stream = s["session"] + "-audio"
        if not (v_stream or a_stream or codecs is not None):
            continue
        tracks = accepts.get("video_tracks", 1) if isinstance(accepts, dict) else 1
        raw_ok = bool(accepts.get("raw_video")) if isinstance(accepts, dict) else False
        out.append(Member(s["session"], video=v_stream, codec=v_codec, audio=a_stream, accepts=codecs,
                          joined=float(s.get("since", 0.0)), video_tracks=max(1, int(tracks)), takes_raw=raw_ok))
    return out


class BridgedRoom:
    def __init__(self, name: str, host: Any) -> None:
        self.name, self.host = name, host
        self.members: list[Member] = []
        self.refused: list[str] = []
        self.routes: dict[Key, Route] = {}         # (target, slot) -> its route; slot 1 is the target's own
        self.sent: dict[Key, tuple[str, str]] = {}
        self.sent_at: dict[Key, float] = {}
        self.pending: set[Key] = set()
        self.pinned = ""
        self.policy = ""                      # '' the config's
        self.speaker, self.previous = "", ""
        self.picker = host.make_picker()
        self.mixer: Any = None
        self.transcoders: dict[tuple[str, str], Any] = {}
        self.grids: dict[str, Any] = {}
        self.gate = HookGate(self._ask_hook, self.apply, lambda d, r: host.m.hook.labels(d, r).inc())
        self.seen_at: dict[str, float] = {}   # member -> when the bridge first heard of it
        self._timed: set[str] = set()         # members whose first routes were timed (edgeroom_bridge_route_seconds)

    # ------------------------------------------------------------ membership
    def update(self, sessions: list[dict[str, Any]]) -> None:
        members = members_of(sessions)
        now = time.monotonic()
        for m in members:
            self.seen_at.setdefault(m.id, now)
        ids = {m.id for m in members}
        for gone in [k for k in self.seen_at if k not in ids]:
            del self.seen_at[gone]
        before = {m.id: m.joined for m in self.members}
        for m in members:   # the session started again (its transport restarted): the routes it kept in memory
            if before.get(m.id, m.joined) != m.joined:     # (by: bridge) are gone, so they are sent again
                for key in [k for k in self.sent if k[0] == m.id]:
                    del self.sent[key]
        # what the transports say they send: a route they lost (a SIP service restarted and took its calls back:
        # the session and its `since` go on, the routes it kept in memory do not) is sent again
        observed = _sending(sessions)
        shows_in = 2 * self.host.config.hub.heartbeat_interval + 0.5    # a route accepted shows in a heartbeat
        for key, want in list(self.sent.items()):
            if now - self.sent_at.get(key, now) > shows_in and observed.get(key, ("", "")) != want:
                del self.sent[key]
        if members != self.members:
            self.members = members
            self.apply()
        else:               # a route whose `route` failed (its transport away, restarting) is sent again
            for key, route in self.routes.items():
                self._send(key, route)

    @property
    def effective_policy(self) -> str:
        return self.policy or self.host.cfg.policy

    # ------------------------------------------------------------ the plan
    def apply(self) -> None:
        h = self.host
        cfg = h.cfg
        ins, out = bridged(self.members, cfg.max_participants)
        newly_refused = [m.id for m in out if m.id not in self.refused]
        for sid in newly_refused:
            h.m.refused.labels(self.name, "full").inc()
            h.log.warning("room %s is full (%d participants, [bridge] max_participants): %s is not bridged",
                          self.name, cfg.max_participants, sid)
            h.publish("bridge.refused", {"room": self.name, "session": sid, "reason": "full",
                                         "max_participants": cfg.max_participants})
        self.refused = [m.id for m in out]
        ids = {m.id for m in ins}
        if self.speaker not in ids:
            self.speaker = ""
        if self.previous not in ids:
            self.previous = ""
        planned = plan(ins, policy=self.effective_policy, speaker=self.speaker, previous=self.previous,
                       pinned=self.pinned, names=h.names)
        final: dict[Key, Route] = {}
        live = set()
        for target, first in planned.items():
            for route in (first, *first.slots):
                if route.source and route.path in ("pass-through", "transcode"):
                    live.add((route.source, target))
                    d = self.gate.decide((route.source, target), self._hook_data(route), cfg.hook_recheck)
                    route = _decided(route, d)
                final[(target, route.slot)] = route
        if len(ins) < 2:
            final = {}     # alone in the room: nothing to forward, the config's routes apply (a hold slate, say)
        self.gate.forget(live)
        self._media(ins, final)
        self.routes = final
        for key, route in final.items():
            self._send(key, route)
        for key in [k for k in self.sent if k not in final]:
            self._release(key)
        counts: dict[str, int] = {}
        for r in final.values():
            counts[r.path] = counts.get(r.path, 0) + 1
        for path in ("pass-through", "transcode", "grid", "blocked", "replaced", "waiting", "asking", "none"):
            h.m.routes.labels(self.name, path).set(counts.get(path, 0))
        h.m.participants.labels(self.name).set(len(ins))

    def _hook_data(self, route: Route) -> dict[str, Any]:
        return {"room": self.name, "source": route.source, "target": route.target, "stream": route.video,
                "codec": route.codec, "path": route.path}

    def _ask_hook(self, body: dict[str, Any], done: Callable[[Any, Exception | None], None]) -> None:
        self.host.request("hook.call", body, done)

    # ------------------------------------------------------------ what the routes need
    def _media(self, members: list[Member], routes: dict[Key, Route]) -> None:
        h = self.host
        want = {r.transcode for r in routes.values() if r.transcode and r.path == "transcode"}
        for key in [k for k in self.transcoders if k not in want]:
            h.drop_media(self.transcoders.pop(key))
        for key in want:
            if key not in self.transcoders:
                self.transcoders[key] = h.make_transcoder(key[0], h.names.transcode(*key), key[1])
        grids = {t: r for (t, _slot), r in routes.items() if r.path == "grid"}
        for t in [t for t in self.grids if t not in grids]:
            h.drop_media(self.grids.pop(t))
        by_id = {m.id: m for m in members}
        for t, r in grids.items():
            g = self.grids.get(t)
            if g is None:
                g = self.grids[t] = h.make_grid(r.video, r.codec)
            g.set_sources([by_id[s].video for s in r.grid if s in by_id])
        if len(members) > 2:
            if self.mixer is None:
                self.mixer = h.make_mixer(self.name)
            self.mixer.set_participants({m.id: m.audio for m in members if m.audio},
                                        {t: h.names.mix(t) for t, slot in routes if slot == 1})
        elif self.mixer is not None:
            h.drop_media(self.mixer)
            self.mixer = None

    # ------------------------------------------------------------ telling the transports
    def _send(self, key: Key, route: Route) -> None:
        want = (route.video, route.audio)
        if self.sent.get(key) == want or key in self.pending:
            return
        self.pending.add(key)
        target, slot = key
        seen = self.seen_at.get(target)

        def done(result: Any, error: Exception | None) -> None:
            self.pending.discard(key)
            if error is not None:
                self.host.m.commands.labels("error").inc()
                self.host.throttled.warning(f"route {target}", f"room {self.name}: routing {_name(key)} "
                                                                f"(video {route.video or '-'}, audio "
                                                                f"{route.audio or '-'}) failed: {error}")
                self.sent.pop(key, None)           # sent again on the next refresh
                return
            self.host.m.commands.labels("ok").inc()
            self.sent[key] = want
            self.sent_at[key] = time.monotonic()
            if seen is not None and target not in self._timed and slot == 1:
                self._timed.add(target)
                self.host.m.join.observe(time.monotonic() - seen)
            current = self.routes.get(key)
            if current is not None and (current.video, current.audio) != want:
                self._send(key, current)           # it changed while this one was on its way

        args: dict[str, Any] = {"session": target, "video": route.video, "by": "bridge"}
        if slot == 1:
            args["audio"] = route.audio
        else:
            args["slot"] = slot
        self.host.request("route", args, done)

    def _release(self, key: Key) -> None:
        """`key`'s target left the bridge (it left the room, or the room is no longer bridged), or no longer has
        that slot's route: its routes go back to the config's."""
        self.sent.pop(key, None)
        target, slot = key
        args: dict[str, Any] = {"session": target, "reset": True, **({"slot": slot} if slot != 1 else {})}
        self.host.request("route", args, lambda result, error: None)

    # ------------------------------------------------------------ every 20 ms
    def tick(self, now: float) -> None:
        if self.mixer is None:
            return
        self.mixer.tick()
        if self.effective_policy == "grid":
            return
        speaker = self.picker.update(self.mixer.levels(), now)
        if speaker and speaker != self.speaker:
            self.previous, self.speaker = self.speaker, speaker
            self.host.m.switches.labels(self.name).inc()
            self.host.publish("bridge.speaker", {"room": self.name, "speaker": speaker, "previous": self.previous})
            self.apply()

    def keyframe(self, stream: str, reason: str) -> dict[str, Any] | None:
        for t in self.transcoders.values():
            if t.out == stream:
                return t.keyframe(reason)
        for g in self.grids.values():
            if g.out == stream:
                return g.keyframe(reason)
        return None

    def recheck(self, source: str = "", target: str = "") -> int:
        n = self.gate.recheck(lambda key: (not source or key[0] == source) and (not target or key[1] == target))
        self.apply()
        return n

    # ------------------------------------------------------------ status, end
    def status(self) -> dict[str, Any]:
        routes = []
        for (target, slot), r in sorted(self.routes.items()):
            d = self.gate.decisions.get((r.source, target))
            routes.append({"target": target, "slot": slot, "source": r.source, "video": r.video, "path": r.path,
                           "codec": r.codec, "audio": r.audio, "heard": list(r.heard), "note": r.note,
                           "hook": {"decision": d.decision, "reason": d.reason, "asked": d.asked} if d else None,
                           "sent": self.sent.get((target, slot)) == (r.video, r.audio)})
        return {"room": self.name, "policy": self.effective_policy, "pinned": self.pinned, "speaker": self.speaker,
                "members": [{"session": m.id, "video": m.video, "codec": m.codec, "audio": m.audio,
                             "accepts": list(m.accepts) if m.accepts is not None else None}
                            for m in self.members if m.id not in self.refused],
                "refused": self.refused, "routes": routes,
                "transcodes": [t.status() for t in self.transcoders.values()],
                "grids": [g.status() for g in self.grids.values()],
                "mix": self.mixer.status() if self.mixer is not None else None,
                "levels": ({k: round(v, 1) for k, v in self.mixer.levels().items()} if self.mixer is not None
                           else {})}

    def close(self, release: bool = True) -> None:
        """The room is no longer bridged (`release`: its sessions' routes go back to the config's), or the service
        stops (routes left as they are: the calls keep what they were sent until the bridge is back)."""
        if release:
            for target in list(self.sent):
                self._release(target)
        for media in [*self.transcoders.values(), *self.grids.values(), *([self.mixer] if self.mixer else [])]:
            self.host.drop_media(media)
        self.transcoders.clear()
        self.grids.clear()
        self.mixer = None
        for path in ("pass-through", "transcode", "grid", "blocked", "replaced", "waiting", "asking", "none"):
            self.host.m.routes.labels(self.name, path).set(0)
        self.host.m.participants.labels(self.name).set(0)


def _sending(sessions: list[dict[str, Any]]) -> dict[Key, tuple[str, str]]:
    """(video, audio) each session's send tracks say they carry, by (session, slot)."""
    out: dict[Key, tuple[str, str]] = {}
    for s in sessions:
        for t in s.get("tracks", []):
            if t.get("direction") != "send":
                continue
            slot = int(t.get("slot", 1))
            video, audio = out.get((s["session"], slot), ("", ""))
            if t.get("kind") == "audio":
                audio = str(t.get("stream", ""))
            else:
                video = str(t.get("stream", ""))
            out[(s["session"], slot)] = (video, audio)
    return out


def _name(key: Key) -> str:
    return key[0] if key[1] == 1 else f"{key[0]} (video slot {key[1]})"


def _decided(route: Route, d: Decision) -> Route:
    """`route` as BEFORE_BRIDGE_VIDEO's decision in force leaves it."""
    if not d.decision:
        return replace(route, video="", path="asking", note="waiting for BEFORE_BRIDGE_VIDEO's answer",
                       transcode=None)
    if d.decision == "block":
        return replace(route, video="", path="blocked", note=f"blocked by BEFORE_BRIDGE_VIDEO ({d.reason})",
                       transcode=None)
    if d.decision == "replace":
        return replace(route, video=d.stream, path="replaced", note=f"replaced by {d.stream} (BEFORE_BRIDGE_VIDEO)",
                       transcode=None)
    return route
