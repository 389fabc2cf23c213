"""The avatar service, `avatar` (unit edgeroom-avatar): every avatar of the box, each a session of its room.

An avatar is a talking face driven by a voice: an audio stream of the bus (`audio`), or voice pushed through
the control plane (`avatar.say`: how an agent that is not on the bus speaks through the face). Its face goes
on the bus as NAME (rgb24 pictures) and the voice, in step with it, as NAME-audio; the session it reports has
those as its tracks and takes nothing (no `accepts`), so the bridge sends both to the room's callers and no
transport needs to know what an avatar is (services/avatar/avatar.py has the timing, docs/avatar.md the story).

Avatars come from the config ([avatars.NAME]) and from `avatar.start`, which is checked exactly like a table
of the file and kept in the state directory's avatars.json (an overlay), so a restarted service brings them
back; `avatar.stop` removes one (a config's stays stopped until started again).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Any

import numpy as np

from services.avatar.avatar import Avatar, AvatarSpec, Timing
from services.avatar.metrics import AvatarMetrics
from services.avatar.providers import Settings, kinds
from services.avatar.spec import NAME_PATTERN, parse_size
from services.control.protocol import ProtocolError
from services.runtime import config as configuration
from services.runtime.schema import parse_list
from services.runtime.service import AsyncService
from services.runtime.state import Overlay, state_dir

__all__ = ["AvatarService"]

FILE = "avatars.json"
ENTRY_KEYS = ("room", "audio", "provider", "image", "size", "fps", "url", "api_key_env", "avatar_id", "model_dir",
              "timeout", "sample_rate")
MAX_SAY_RATE = 48000


def spec_of(name: str, entry: Any, origin: str) -> AvatarSpec:
    w, h = parse_size(entry.size)
    settings = Settings(url=entry.url, api_key_env=entry.api_key_env, avatar_id=entry.avatar_id,
                        model_dir=entry.model_dir, timeout=entry.timeout, sample_rate=entry.sample_rate)
    return AvatarSpec(name=name, room=entry.room, provider=entry.provider, image=entry.image, width=w, height=h,
                      fps=entry.fps, audio=entry.audio, settings=settings, origin=origin)


class AvatarService(AsyncService):
    kind = "avatar"

    def setup(self) -> None:
        try:
            import av  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"the avatar service needs the media extra ({exc.name} is missing): pip install "
                               "'edgeroom[media,webrtc]'") from None
        if self.config.avatar.ice_addresses:    # a WebRTC provider (anam) on this box or a known interface
            from services.webrtc.peer import limit_host_addresses
            limit_host_addresses(parse_list(self.config.avatar.ice_addresses))
        self.m = AvatarMetrics(self.registry)
        self.prefix = self.config.bus.prefix
        self.avatars: dict[str, Avatar] = {}
        self.failed: dict[str, str] = {}          # avatars of the config that could not start, and why
        self.path = state_dir(self.config) / FILE
        args = {k: str for k in ("name", "room", "audio", "provider", "image", "size", "url", "api_key_env",
                                 "avatar_id", "model_dir")}
        self.offer("avatar.start", self.cmd_start, "start an avatar in a room (args: room, image, audio, provider, "
                   "name, size, fps, url, api_key_env, avatar_id, model_dir, timeout, sample_rate)",
                   args={**args, "fps": float, "timeout": float, "sample_rate": int}, required=("room", "image"))
        self.offer("avatar.stop", self.cmd_stop, "stop an avatar (args: name)", args={"name": str},
                   required=("name",))
        self.offer("avatar.list", self.cmd_list, "the avatars: state, provider, frames, latency, errors")
        self.offer("avatar.say", self.cmd_say, "push voice into an avatar: base64 PCM16 LE (args: name, pcm, rate, "
                   "channels)", args={"name": str, "pcm": str, "rate": int, "channels": int},
                   required=("name", "pcm", "rate"))
        self.on_stop(self._stopping, "the avatars")

    @property
    def timing(self) -> Timing:
        c = self.config.avatar
        return Timing(turn_gap=c.turn_gap, max_delay=c.max_delay, backoff_max=c.backoff_max,
                      push_limit=c.push_limit)

    async def started(self) -> None:
        overlay = Overlay.read(self.path)
        origin = {name: "command" for name in overlay.added}
        entries = overlay.apply(self.config.avatars,
                                lambda n, t: configuration.entry_from_dict("avatars", n, t, str(self.path)))
        for name, entry in entries.items():
            try:
                self._start(spec_of(name, entry, origin.get(name, "config")))
            except ValueError as exc:
                self.failed[name] = str(exc)
                self.log.error("avatar %s: %s", name, exc)
        self.sessions_changed()

    def apply(self, new: Any, changes: list[Any]) -> list[str]:
        """[avatar]'s timing applies at once to every avatar; an avatar's own table needs a restart (or `ctl
        avatar stop` and `start`)."""
        self.config = new
        for a in self.avatars.values():
            a.timing = self.timing
        return [c.key for c in changes if not c.live]

    # ------------------------------------------------------------ avatars
    def _start(self, spec: AvatarSpec) -> Avatar:
        from services.avatar.face import load_face
        face, picture = load_face(spec.image, spec.width, spec.height, spec.fps)
        a = Avatar(spec, face=face, reference=picture, prefix=self.prefix, metrics=self.m, timing=self.timing,
                   log=self.log)
        a.begin(self.loop.aio)
        self.avatars[spec.name] = a
        self.failed.pop(spec.name, None)
        self.log.info("avatar %s: in room %s, %s, driven by %s", spec.name, spec.room, spec.provider,
                      spec.audio or "pushed voice")
        return a

    def _find(self, name: str) -> Avatar:
        a = self.avatars.get(name)
        if a is None:
            raise ProtocolError("not_found", f"no avatar {name!r} (`edgeroom ctl avatar list` lists them)")
        return a

    def _overlay(self, change: Any) -> None:
        overlay = Overlay.read(self.path)
        change(overlay)
        try:
            overlay.write()
        except OSError as exc:
            self.log.error("cannot write %s: %s: not remembered across a restart", overlay.path, exc)

    # ------------------------------------------------------------ commands
    def cmd_start(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args.pop("name", "") or f"avatar-{args['room']}".lower()
        if len(self.avatars) >= self.config.avatar.max_avatars:
            raise ProtocolError("unavailable", f"{len(self.avatars)} avatars run already ([avatar] max_avatars = "
                                               f"{self.config.avatar.max_avatars})")
        if name in self.avatars:
            raise ProtocolError("bad_args", f"avatar {name!r} runs already (`edgeroom ctl avatar stop {name}` first)")
        if not re.match(NAME_PATTERN, name):
            raise ProtocolError("bad_args", f"avatar name {name!r} must match {NAME_PATTERN} (give --name)")
        body = {k: v for k, v in args.items() if k in ENTRY_KEYS}
        try:
            entry = configuration.entry_from_dict("avatars", name, body)
            a = self._start(spec_of(name, entry, "command"))
        except ValueError as exc:       # a ConfigError names the key; load_face names the file
            raise ProtocolError("bad_args", str(exc)) from None
        self._overlay(lambda o: o.add(name, body))
        self.sessions_changed()
        return a.status()

    def cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["name"]
        a = self._find(name)
        del self.avatars[name]
        self.loop.spawn(self._close(a), name=f"close avatar {name}")
        self._overlay(lambda o: o.remove(name, in_config=name in self.config.avatars))
        self.sessions_changed()
        return {"name": name, "stopped": True}

    def cmd_list(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"avatars": [a.status() for a in self.avatars.values()],
                "failed": [{"name": n, "problem": p} for n, p in sorted(self.failed.items())],
                "providers": {k: v.summary for k, v in kinds().items()}}

    def cmd_say(self, args: dict[str, Any]) -> dict[str, Any]:
        a = self._find(args["name"])
        rate, channels = args["rate"], args.get("channels", 1)
        if not (8000 <= rate <= MAX_SAY_RATE) or not (1 <= channels <= 8):
            raise ProtocolError("bad_args", f"rate must be 8000 to {MAX_SAY_RATE} and channels 1 to 8, got {rate} Hz "
                                            f"and {channels}")
        try:
            raw = base64.b64decode(args["pcm"], validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_args", "pcm is not base64") from None
        if not raw or len(raw) % (2 * channels):
            raise ProtocolError("bad_args", f"pcm is {len(raw)} bytes: not whole {channels}-channel s16 samples")
        pcm = np.frombuffer(raw, "<i2").astype(np.int16).reshape(-1, channels)
        try:
            waiting = a.say(pcm, rate)
        except ValueError as exc:
            raise ProtocolError("unavailable", f"avatar {a.spec.name}: {exc}") from None
        return {"name": a.spec.name, "queued_s": round(len(pcm) / rate, 3), "waiting_s": round(waiting, 3)}

    # ------------------------------------------------------------ the hub's view
    def describe(self) -> dict[str, Any]:
        avatars = list(self.avatars.values())
        up = sum(1 for a in avatars if a.state == "ready")
        status = f"{len(avatars)} avatar(s), {up} up" + (f", {len(self.failed)} failed" if self.failed else "")
        return {"status": status, "sessions": [a.session() for a in avatars],
                "streams": [s for a in avatars for s in a.sink.streams()],
                "rate": round(sum(a.fps for a in avatars), 1)}

    async def _close(self, a: Avatar) -> None:
        await a.close()
        self.sessions_changed()         # its rings are gone now: the hub's list of streams follows at once

    def _stopping(self) -> None:
        aio = self.loop.aio
        if aio.is_closed() or not self.avatars:
            return
        try:
            aio.run_until_complete(asyncio.wait_for(self._close_all(), 5.0))
        except (RuntimeError, TimeoutError) as exc:
            self.log.debug("stopping: %s", exc)

    async def _close_all(self) -> None:
        await asyncio.gather(*(a.close() for a in self.avatars.values()), return_exceptions=True)
        self.avatars.clear()
