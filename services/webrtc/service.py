"""The WebRTC service, `webrtc` (unit edgeroom-webrtc): browsers and WebRTC tools reach the box over HTTP.

* **WHIP** (RFC 9725): `POST /whip/NAME` publishes camera and microphone as session NAME of a
  room: its video lands on the bus as NAME (the browser's H.264 or VP8 access units, never
  decoded here), its audio as NAME-audio (s16). PATCH trickles ICE, DELETE ends it.
* **WHEP**: `POST /whep/STREAM` plays any stream of the bus. The access units go out as they
  are when the viewer takes their codec and profile, else an encoder's output of the same
  pictures (services/webrtc/choose.py); the stream's audio (STREAM-audio) goes with it.
* **Room calls**: `POST /rooms/ROOM/call` publishes like WHIP and receives the session's
  routes ([webrtc] send_video/send_audio, `edgeroom ctl route`, the bridge).
* **WebSocket video** in RoomKit's format at `/ws/ROOM/SESSION` (services/webrtc/wsvideo.py).
* **The web page** at `/` (services/webrtc/web/): streams as live players, rooms, join, events.

Every connection that does not come up within `connect_timeout`, or stays disconnected for
`disconnected_timeout`, is closed and counted; a viewer that does not keep up skips to the
next keyframe instead of adding latency. Errors inside aiortc's own tasks are logged and
counted (`edgeroom_webrtc_library_errors_total`) and end nothing but what they broke: one
peer's bad packet never stops the service.
"""
from __future__ import annotations

import asyncio
import gc
import ssl
import time
from typing import Any

from services.calls.book import RouteBook, slot_session
from services.calls.config import Route
from services.calls.route import stream_kind
from services.capture.sink import Sink
from services.control.protocol import ProtocolError
from services.control.tokens import FILE as TOKENS_FILE
from services.control.tokens import TokenBook, parse_tokens
from services.runtime.keyframes import KeyframeRequests, cannot
from services.runtime.schema import parse_list
from services.runtime.service import AsyncService
from services.runtime.state import state_dir
from services.runtime.streams import AUDIO

__all__ = ["Webrtc"]

HUB_TIMEOUT = 3.0


class Webrtc(AsyncService):
    kind = "webrtc"

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        try:
            import aiohttp  # noqa: F401
            import aiortc  # noqa: F401
            import av  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"the WebRTC service needs the media and webrtc extras ({exc.name} is missing): "
                               "pip install 'edgeroom[media,webrtc]' (scripts/install.sh installs them by "
                               "default)") from None
        from services.webrtc.events import EventRelay
        from services.webrtc.metrics import WebrtcMetrics
        from services.webrtc.peer import add_h264_profiles, limit_host_addresses

        self.cfg = self.config.webrtc
        self.m = WebrtcMetrics(self.registry)
        limit_host_addresses(parse_list(self.cfg.ice_addresses))
        add_h264_profiles()
        self.tokens = TokenBook(parse_tokens(self.cfg.tokens), state_dir(self.config) / TOKENS_FILE)
        self.open_endpoints = set(parse_list(self.cfg.open))
        if not len(self.tokens) and len(self.open_endpoints) < 6:
            self.log.warning("no bearer token is configured ([webrtc] tokens, `edgeroom keys token add NAME`): "
                             "every endpoint but %s answers 401", ", ".join(sorted(self.open_endpoints)) or "none")
        self.sessions: dict[str, Any] = {}          # by id
        self.websockets: dict[str, Any] = {}        # by session name
        self.routes = RouteBook(self, video_codecs=("h264", "vp8"))
        self.keyframes = KeyframeRequests(self.registry, self.loop, self._make_keyframe)
        self.offer_keyframes(self._keyframe_request)
        self.events = EventRelay(self.endpoints.events, self.loop, self.m.events,
                                 self.config.control.max_message_bytes)
        self.own(self.events, lambda e: e.close(), "the event subscription")
        self.loop.aio.set_exception_handler(self._library_error)
        self.port = 0
        self.scheme = "https" if self.cfg.tls_cert else "http"
        self.runner: Any = None
        self.ws_metrics: Any = None
        self.loop.every(1.0, self._reap)
        self.on_stop(self._stopping, "peer connections")

    def _library_error(self, _aio: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """aiortc and aioice start tasks of their own; one that fails ends its connection, not the service. An
        error of the service's own code still stops it (a bug: the service restarts)."""
        exc = context.get("exception")
        tb = getattr(exc, "__traceback__", None)
        innermost = ""
        while tb is not None:
            innermost = str(tb.tb_frame.f_globals.get("__name__", ""))
            tb = tb.tb_next
        ours = innermost.startswith("services.")
        if exc is not None and ours:
            self.loop._on_error(_aio, context)
            return
        self.m.library_errors.inc()
        self.throttled.warning("library", f"a task of aiortc/aioice failed: {context.get('message')}: "
                                          f"{exc.__class__.__name__ if exc else ''} {exc or ''}")

    async def started(self) -> None:
        from aiohttp import web

        from services.webrtc.http import make_app
        ssl_context = None
        if self.cfg.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ssl_context.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"[webrtc] tls_cert/tls_key: cannot load {self.cfg.tls_cert}: {exc}") from None
        self.runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.address, self.cfg.port, ssl_context=ssl_context,
                           shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"[webrtc] cannot listen on {self.cfg.address}:{self.cfg.port}: {exc.strerror or exc}") \
                from None
        server = site._server
        self.port = server.sockets[0].getsockname()[1] if server is not None and server.sockets else self.cfg.port
        self.log.info("WebRTC on %s://%s:%d (WHIP /whip/NAME, WHEP /whep/STREAM, rooms, /ws, the page at /)",
                      self.scheme, self.cfg.address, self.port)
        gc.collect()
        gc.freeze()

    def apply(self, new: Any, changes: list[Any]) -> list[str]:
        self.cfg = new.webrtc
        for s in self.sessions.values():
            if s.kind == "call":
                self.routes.configure(s.name, self.cfg.route())
        return [c.key for c in changes if not c.live]

    # ------------------------------------------------------------ what sessions need
    @property
    def prefix(self) -> str:
        return str(self.config.bus.prefix)

    def make_sink(self, name: str) -> Sink:
        return Sink(name, self.prefix, self.m.sink(name))

    def make_slot_reader(self, session: Any, slot: int, codec: str) -> Any:
        """The route of a room call's further video track (slot 2, 3, ...): nothing until the bridge (or `ctl route
        SESSION --slot N`) names a stream."""
        return self.routes.reader(slot_session(session.route_session, slot), Route(), video_codecs=(codec,))

    def make_reader(self, session: Any) -> Any:
        route = session.route or Route()
        codecs = (session.video_codec,) if session.video_codec else None
        return self.routes.reader(session.route_session, route, video_codecs=codecs)

    # ------------------------------------------------------------ the three kinds
    def _admit(self, kind: str) -> None:
        from services.webrtc.http import HttpError
        if len(self.sessions) >= self.cfg.max_sessions:
            raise HttpError(503, "busy", f"the box has {len(self.sessions)} peer connections open "
                                         f"([webrtc] max_sessions = {self.cfg.max_sessions})")

    def _name_free(self, name: str) -> None:
        from services.webrtc.http import HttpError
        taken = [s for s in self.sessions.values() if s.name == name and s.publishes] or name in self.websockets
        if taken or stream_kind(self.prefix, name) is not None:
            raise HttpError(409, "conflict", f"{name!r} is taken: a stream of that name is on the bus (choose "
                                             "another session name)")

    async def publish(self, name: str, room: str, offer: str, who: str) -> tuple[Any, str]:
        from services.webrtc.sessions import PeerSession
        self._admit("publisher")
        self._name_free(name)
        self._check_offer(offer)
        return await self._open(PeerSession(self, "publisher", name, room, token_name=who), offer)

    async def room_call(self, room: str, name: str, offer: str, who: str) -> tuple[Any, str]:
        import secrets

        from services.webrtc.choose import preferences
        from services.webrtc.sessions import PeerSession
        self._admit("call")
        name = name or f"web-{secrets.token_hex(3)}"
        self._name_free(name)
        self._check_offer(offer)
        session = PeerSession(self, "call", name, room, route=self.cfg.route(), token_name=who)
        prefer = None
        video = self._offered(offer).get("video", [])
        if video:
            choice = self._call_codec(video)
            session.video_codec, prefer = choice.codec, preferences(choice)
        return await self._open(session, offer, prefer)

    def _call_codec(self, video: list[Any]) -> Any:
        """A room call's video codec, both ways: the codec of its video route's stream when the peer takes it (the
        bytes pass through), else H.264, else VP8 (a route of the other codec is refused, with its reason)."""
        from services.webrtc.choose import Choice, stream_facts
        facts = stream_facts(self.prefix, self.cfg.send_video) if self.cfg.send_video else None
        takes = {o.codec for o in video}
        if facts is not None and facts[0] == "encoded" and facts[1] in takes:
            return Choice(self.cfg.send_video, facts[1], facts[2], False)
        codec = "h264" if "h264" in takes else "vp8"
        return Choice(self.cfg.send_video, codec, None, False)

    async def view(self, stream: str, offer: str, who: str) -> tuple[Any, str]:
        from services.webrtc.choose import NoCodec, choose, preferences
        from services.webrtc.http import HttpError
        from services.webrtc.sessions import PeerSession
        self._admit("viewer")
        viewers = sum(1 for s in self.sessions.values() if s.kind == "viewer" and s.name == stream)
        if viewers >= self.cfg.max_viewers:
            raise HttpError(503, "busy", f"stream {stream!r} has {viewers} viewers ([webrtc] max_viewers)")
        self._check_offer(offer)
        offered = self._offered(offer)
        try:
            choice = choose(offered, stream, self.prefix, getattr(self.config, "encoders", {}) or {})
        except LookupError:
            raise HttpError(404, "not_found", f"no stream {stream!r} on the bus (GET /api/streams lists them)") \
                from None
        except NoCodec as exc:
            raise HttpError(406, "no_codec", str(exc)) from None
        audio = stream + AUDIO if stream_kind(self.prefix, stream + AUDIO) == "audio" else ""
        session = PeerSession(self, "viewer", stream, "", route=Route(choice.stream, audio), video_codec=choice.codec,
                              transcoded=choice.transcoded, token_name=who)
        return await self._open(session, offer, preferences(choice))

    def _offered(self, offer: str) -> dict[str, Any]:
        from services.webrtc.choose import offered
        from services.webrtc.http import HttpError
        try:
            return offered(offer)
        except ValueError as exc:
            raise HttpError(400, "bad_offer", str(exc)) from None

    def _check_offer(self, offer: str) -> None:
        from services.webrtc.http import HttpError
        kinds = self._offered(offer)
        if not kinds:
            raise HttpError(400, "bad_offer", "the offer has no audio or video media")
        video = kinds.get("video", [])
        if video and not any(o.codec in ("h264", "vp8") for o in video):
            raise HttpError(406, "no_codec", "the offer's video has neither H.264 nor VP8 (offered: "
                                             f"{', '.join(sorted({o.codec for o in video} - {'rtx'}) or ['none'])})")

    async def _open(self, session: Any, offer: str, prefer: list[Any] | None = None) -> tuple[Any, str]:
        from services.webrtc.http import HttpError
        self.sessions[session.id] = session
        started = time.monotonic()
        try:
            kinds = tuple(k for k in ("video", "audio") if k in self._offered(offer))
            answer = await session.answer(offer, prefer, kinds)
        except HttpError:
            await self.end(session, "refused")
            raise
        except Exception as exc:   # aiortc refuses offers with its own exceptions (ValueError, OperationError)
            await self.end(session, "bad_offer")
            raise HttpError(400, "bad_offer", f"the offer cannot be answered: {exc.__class__.__name__}: {exc}") \
                from None
        session.offered_at = started
        self._gauge()
        self.log.info("%s %s%s: answered (%s)", session.kind, session.name,
                      f" in room {session.room}" if session.room else "",
                      session.video_codec or "publish")
        return session, answer

    def find(self, sid: str) -> Any:
        from services.webrtc.http import HttpError
        session = self.sessions.get(sid)
        if session is None:
            raise HttpError(404, "not_found", "no such session (it ended, or the id is wrong)")
        return session

    async def end(self, session: Any, why: str) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        # counted before the peer connection's close is awaited: the listing and the metrics agree at every moment
        self.m.ended.labels(session.kind, why).inc()
        self._gauge()
        self.log.info("%s %s ended: %s", session.kind, session.name, why)
        await session.close(why)
        if session.reader is not None:
            self.routes.close(session.route_session, forget=session.kind != "call")
            session.reader = None
        for slot in list(session.slots):
            self.routes.close(slot_session(session.route_session, slot), forget=True)
        session.slots.clear()
        if session.sink is not None:
            session.sink.close()
            self.m.forget(session.name)

    def _gauge(self) -> None:
        self.sessions_changed()
        counts: dict[tuple[str, str], int] = {(k, p): 0 for k in ("publisher", "viewer", "call")
                                              for p in ("pass-through", "transcode", "")}
        for s in self.sessions.values():
            path = ("transcode" if s.transcoded else "pass-through") if s.kind == "viewer" else ""
            counts[(s.kind, path)] = counts.get((s.kind, path), 0) + 1
        for (kind, path), n in counts.items():
            if kind == "viewer" and not path or kind != "viewer" and path:
                continue
            self.m.sessions.labels(kind, path).set(n)

    # ------------------------------------------------------------ once a second
    def _reap(self) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if s.connected_at is None and now - s.created > self.cfg.connect_timeout:
                why = "connect_timeout"
            elif s.disconnected_at is not None and now - s.disconnected_at > self.cfg.disconnected_timeout:
                why = "disconnected"
            else:
                if s.connected_at is not None and not getattr(s, "_timed", False):
                    s._timed = True
                    self.m.connect_seconds.observe(s.connected_at - getattr(s, "offered_at", s.created))
                continue
            self.loop.spawn(self.end(s, why))

    async def _stopping_async(self) -> None:
        for s in list(self.sessions.values()):
            await self.end(s, "stopping")
        if self.runner is not None:
            await self.runner.cleanup()

    def _stopping(self) -> None:
        aio = self.loop.aio
        if aio.is_closed():
            return
        try:
            aio.run_until_complete(asyncio.wait_for(self._stopping_async(), 3.0))
        except (RuntimeError, TimeoutError) as exc:
            self.log.debug("stopping: %s", exc)

    # ------------------------------------------------------------ keyframes of publishers' streams
    def _keyframe_request(self, stream: str, reason: str) -> dict[str, Any]:
        session = self._publisher_of(stream)
        if session is None:
            ws = self.websockets.get(stream)
            if ws is None:
                raise ProtocolError("not_found", f"{self.id} does not produce {stream!r}")
            ws.ask_keyframe(reason)
            return {"made": True, "how": "websocket", "throttled": False, "waiting": 0.0}
        if session.video_receiver is None:
            return cannot("the publisher sends no video")
        return self.keyframes.request(stream, reason)

    def _make_keyframe(self, stream: str) -> str:
        session = self._publisher_of(stream)
        if session is not None:
            session.want_keyframe("requested")
        return "pli"

    def request_pli(self, session: Any, reason: str) -> None:
        session.want_keyframe(reason)

    def _publisher_of(self, stream: str) -> Any:
        for s in self.sessions.values():
            if s.publishes and s.name == stream:
                return s
        return None

    # ------------------------------------------------------------ the hub, for the page
    async def hub(self, command: str, args: dict[str, Any] | None = None) -> Any:
        from services.webrtc.http import HttpError
        if self.link is None:
            raise HttpError(503, "hub", "the hub is not reachable")
        done: asyncio.Future[Any] = self.loop.aio.create_future()

        def answered(result: Any, error: Exception | None) -> None:
            if not done.done():
                if error is not None:
                    done.set_exception(HttpError(503, "hub", f"the hub answered {command}: {error}"))
                else:
                    done.set_result(result)

        self.link.request(command, args, answered)
        try:
            return await asyncio.wait_for(done, HUB_TIMEOUT)
        except TimeoutError:
            raise HttpError(504, "hub", f"the hub did not answer {command} within {HUB_TIMEOUT:g} s") from None

    def listing(self) -> dict[str, Any]:
        return {"port": self.port, "sessions": [s.describe() for s in self.sessions.values()],
                "websockets": [w.describe() for w in self.websockets.values()]}

    # ------------------------------------------------------------ WebSocket video
    async def websocket(self, request: Any, room: str, name: str) -> Any:
        """`GET /ws/ROOM/SESSION`: one WebSocket client, a session of ROOM (services/webrtc/wsvideo.py). The token
        was checked before the upgrade; a session id in use is refused (409) before it too."""
        from services.webrtc.http import HttpError
        from services.webrtc.wsvideo import WsLimits, WsMetrics, WsVideoSession, response
        self._admit("websocket")
        self._name_free(name)
        if self.ws_metrics is None:
            self.ws_metrics = WsMetrics(self.registry)
        limits = WsLimits(max_message_bytes=self.cfg.ws_max_message_bytes,
                          max_messages_per_s=self.cfg.ws_max_messages_per_s,
                          max_bytes_per_s=max(self.cfg.ws_max_kbps * 125, self.cfg.ws_max_message_bytes),
                          idle_timeout_s=self.cfg.idle_timeout)
        ws = response(limits)
        if not ws.can_prepare(request).ok:
            raise HttpError(400, "not_websocket", "GET /ws/ROOM/SESSION is a WebSocket endpoint (Upgrade: websocket)")
        await ws.prepare(request)
        sink = self.make_sink(name)
        reader = self.routes.reader(name, self.cfg.route(), raw_video=True)   # raw_rgb24 is RoomKit's third codec
        session = WsVideoSession(ws, session=name, room=room, sink=sink, reader=reader, limits=limits,
                                 metrics=self.ws_metrics, log=self.log, loop=self.loop.aio)
        self.websockets[name] = session
        self.sessions_changed()
        try:
            why = await session.run()
            self.log.info("websocket %s in room %s ended: %s", name, room, why)
        finally:
            self.websockets.pop(name, None)
            self.sessions_changed()
            self.routes.close(name)
            sink.close()
            self.m.forget(name)
        return ws

    # ------------------------------------------------------------ what the hub sees
    def describe(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for s in self.sessions.values():
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        status = f"{self.scheme}://{self.cfg.address}:{self.port}; " + (
            ", ".join(f"{n} {k}(s)" for k, n in sorted(kinds.items())) or "no peer connections")
        if self.websockets:
            status += f", {len(self.websockets)} websocket(s)"
        sessions = [{"id": s.name, "room": s.room, "kind": "publisher" if s.kind == "publisher" else "call",
                     "tracks": s.tracks(), "transport": "webrtc",
                     **({"accepts": s.accepts()} if s.reader is not None and s.kind == "call" else {})}
                    for s in self.sessions.values() if s.publishes]
        sessions += [{"id": name, "room": w.room, "kind": "call", "tracks": w.tracks(), "transport": "websocket",
                      **({"accepts": w.reader.accepts()} if w.reader is not None else {})}
                     for name, w in self.websockets.items()]
        streams = [s.name for s in self.sessions.values() if s.publishes and s.sink is not None]
        streams += [w.sink.stream for w in self.websockets.values()]
        return {"status": status[:200], "sessions": sessions, "streams": streams}
