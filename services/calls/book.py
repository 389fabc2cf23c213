"""RouteBook: the routes of a transport's sessions, from its config and from the `route` command.

One per transport service. It answers the `session.route` offer, which the hub's `route
{session, video?, audio?, reset?}` command forwards to the service that reports the
session (`edgeroom ctl route SESSION video=cam2`), and gives each session its RouteReader:

    self.routes = RouteBook(self, video_codecs=("h264", "vp8"))      # in setup(): offers session.route
    reader = self.own(self.routes.reader("call1", cfg.route()))      # the config's route, or the command's
    self.routes.configure("call1", new_cfg.route())                  # in apply(): a reloaded config
    self.routes.close("call1", forget=True)                          # a call that ended for good

A route set by command is kept in `routes.json` in the state directory (an overlay, like
sources.json: services/runtime/state.py), by session id, so it outlives the transport's
restart; it wins over the config's route of that track until `reset` puts the config's
back. Each command is checked before anything changes (a stream of the wrong kind is
refused with bad_args, naming the stream and what it carries); a route that cannot be kept
in the overlay is undone, so a route in effect is always a route that is kept.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import framebus
from services.calls.config import ROUTE_OFFER, STREAM_OR_NONE, TRACKS, Route
from services.calls.route import RouteMetrics, RouteReader
from services.control.protocol import ProtocolError
from services.runtime.state import Overlay, state_dir

if TYPE_CHECKING:
    from services.runtime.service import Service

__all__ = ["FILE", "MAX_SLOTS", "RouteBook", "slot_session"]

FILE = "routes.json"
SLOT, MAX_SLOTS = ".v", 16      # a session's further video tracks: readers NAME.v2, NAME.v3, ...
_STREAM = re.compile(STREAM_OR_NONE)


class RouteBook:
    def __init__(self, service: Service, *, video_codecs: tuple[str, ...] = (), raw_video: bool = False) -> None:
        """`video_codecs`: what the transport can send as video (() any); `raw_video`: it sends raw pictures too."""
        self.service = service
        self.prefix = service.config.bus.prefix
        self.path = state_dir(service.config) / FILE
        self.video_codecs, self.raw_video = video_codecs, raw_video
        self.metrics = RouteMetrics(service.registry)
        self.readers: dict[str, RouteReader] = {}
        self.configured: dict[str, Route] = {}
        self.commanded: dict[str, dict[str, str]] = self._read().added
        self.bridged: dict[str, dict[str, str]] = {}     # tracks the bridge set (by="bridge"): kept in memory only
        service.offer(ROUTE_OFFER, self._command, "show or change what a session of this service sends (args: "
                      "session, video, audio, reset, by, slot)",
                      args={"session": str, "video": str, "audio": str, "reset": bool, "by": str, "slot": int},
                      required=("session",))

    # --- the transport's side --------------------------------------------------------------
    def reader(self, session: str, configured: Route, *, video_codecs: tuple[str, ...] | None = None,
               raw_video: bool | None = None) -> RouteReader:
        """The reader of `session`'s routes: the config's, with the tracks set by command instead.
        `video_codecs`: what this session can send, when it is not the book's (a call's agreed codec);
        `raw_video`: whether it sends raw pictures, when it is not the book's (a WebSocket beside WebRTC)."""
        if session in self.readers:
            raise ValueError(f"session {session!r} has a route reader already")
        service = self.service
        reader = RouteReader(session, self._effective(session, configured), prefix=self.prefix,
                             ask=service.request_keyframe, metrics=self.metrics,
                             video_codecs=self.video_codecs if video_codecs is None else video_codecs,
                             raw_video=self.raw_video if raw_video is None else raw_video,
                             warn=lambda text: service.throttled.warning(f"route {session}", text))
        self.readers[session], self.configured[session] = reader, configured
        return reader

    def configure(self, session: str, configured: Route) -> None:
        """The config's route of `session` changed (a reload): tracks not set by command follow it."""
        reader = self.readers.get(session)
        if reader is None:
            return
        self.configured[session] = configured
        route = self._effective(session, configured)
        try:
            reader.set(video=route.video, audio=route.audio)
        except (ValueError, framebus.BusError) as exc:
            self.service.log.warning("session %s: the config's route is refused: %s", session, exc)

    def close(self, session: str, forget: bool = False) -> None:
        """The session is over: its reader closes; with `forget`, its commanded routes are dropped too
        (a call that will never come back), else they wait for a session of the same id."""
        reader = self.readers.pop(session, None)
        self.configured.pop(session, None)
        self.bridged.pop(session, None)
        if reader is not None:
            reader.close()
        if forget and session in self.commanded:
            self._keep(session, None)

    def _effective(self, session: str, configured: Route) -> Route:
        return configured.with_(**self.commanded.get(session, {})).with_(**self.bridged.get(session, {}))

    # --- the command ---------------------------------------------------------------------------
    def _command(self, args: dict[str, Any]) -> dict[str, Any]:
        slot = args.get("slot", 1)
        session = slot_session(args["session"], slot)
        reader = self.readers.get(session)
        if reader is None and slot != 1 and args["session"] in self.readers:
            slots = 1 + sum(1 for k in self.readers if k.startswith(args["session"] + SLOT))
            raise ProtocolError("not_found", f"session {args['session']!r} has no video slot {slot} (it takes "
                                             f"{slots} video track(s))")
        if reader is None:
            raise ProtocolError("not_found", f"{self.service.id} has no session {session!r} (its sessions: "
                                             f"{', '.join(sorted(self.readers)) or 'none'})")
        if slot != 1 and "audio" in args:
            raise ProtocolError("bad_args", f"video slot {slot} of session {args['session']!r} sends video only")
        changes = {track: args[track] for track in TRACKS if track in args}
        by = args.get("by", "command")
        if by not in ("command", "bridge"):
            raise ProtocolError("bad_args", f"by must be command or bridge, got {by!r}")
        if args.get("reset"):
            if changes:
                raise ProtocolError("bad_args", "reset puts back the config's routes: give it without video or audio")
            self.bridged.pop(session, None)
            self._keep(session, None)
            configured = self.configured[session]
            reader.set(video=configured.video, audio=configured.audio)
        elif changes and by == "bridge":
            # the bridge's routes live as long as the bridge says so: never written to the overlay (a bridge
            # turned off or gone resets them; a restarted transport gets them again from the bridge)
            try:
                reader.set(**changes)
            except ValueError as exc:
                raise ProtocolError("bad_args", f"route of session {session!r}: {exc}") from None
            except framebus.BusError as exc:
                raise ProtocolError("unavailable", f"route of session {session!r}: {exc}") from None
            self.bridged[session] = {**self.bridged.get(session, {}), **changes}
        elif changes:
            before = reader.route
            try:
                reader.set(**changes)   # checked first: a refusal changes nothing
            except ValueError as exc:
                raise ProtocolError("bad_args", f"route of session {session!r}: {exc}") from None
            except framebus.BusError as exc:
                raise ProtocolError("unavailable", f"route of session {session!r}: {exc}") from None
            try:
                self._keep(session, {**self.commanded.get(session, {}), **changes})
            except ProtocolError:
                reader.set(video=before.video, audio=before.audio)   # a route in effect is a route kept
                raise
            bridged = self.bridged.get(session, {})
            for track in changes:
                bridged.pop(track, None)
            self.service.log.info("session %s: route set by command: %s", session,
                                  ", ".join(f"{k}={v or '(none)'}" for k, v in changes.items()))
        return self.show(session)

    def show(self, session: str) -> dict[str, Any]:
        """`session`'s routes: per track what is asked, what is sent now, its state, and where it came from."""
        reader = self.readers[session]
        mine, bridged = self.commanded.get(session, {}), self.bridged.get(session, {})
        tracks = {track: {**status, "origin": "bridge" if track in bridged else "command" if track in mine
                          else "config"}
                  for track, status in reader.status().items()}
        return {"session": session, "service": self.service.id, **tracks, "overlay": str(self.path)}

    # --- the overlay -----------------------------------------------------------------------------
    def _read(self) -> Overlay:
        overlay = Overlay.read(self.path)
        if overlay.problem:
            self.service.log.warning("%s", overlay.problem)
        for session, entry in list(overlay.added.items()):
            if not (isinstance(entry, dict) and set(entry) <= set(TRACKS)
                    and all(isinstance(v, str) and _STREAM.match(v) for v in entry.values())):
                self.service.log.warning("ignoring the routes of %s in %s: not {video, audio} stream names",
                                         session, self.path)
                del overlay.added[session]
        return overlay

    def _keep(self, session: str, tracks: dict[str, str] | None) -> None:
        """Write `session`'s commanded tracks (None: none) into the overlay, under a lock: several
        transports share the file."""
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            with _locked(self.path.with_name(f".{FILE}.lock")):
                overlay = self._read()
                if tracks:
                    overlay.add(session, tracks)
                else:
                    overlay.remove(session, in_config=False)
                overlay.write()
        except OSError as exc:
            raise ProtocolError("unavailable", f"cannot keep the route in {self.path}: {exc.strerror or exc}; "
                                               "nothing changed") from None
        self.commanded = overlay.added


def slot_session(session: str, slot: int) -> str:
    """The reader id of `session`'s video slot `slot` (a room call that takes several video tracks: docs/calls.md);
    slot 1 is the session's own."""
    if not 1 <= slot <= MAX_SLOTS:
        raise ProtocolError("bad_args", f"slot must be within 1..{MAX_SLOTS}, got {slot}")
    return session if slot == 1 else f"{session}{SLOT}{slot}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock
