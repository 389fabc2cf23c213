"""RouteReader: what a call transport sends, read off the bus, switched on a keyframe.

A session's outbound tracks are *routes*: the stream it sends as video and the one it
sends as audio (`Route(video="cam", audio="cam-audio")`; "" sends nothing on that track).
A transport (RTP, SIP, WebRTC, WebSocket) never attaches to the bus itself: it keeps one
`RouteReader` per session and sends what the reader hands it.

    reader = book.reader("call1", Route(video="cam", audio="cam-audio"))   # services/calls/book.py
    loop.add_reader(reader.fileno(), send)         # one fd for the session, stable for life

    def send() -> None:
        while (m := reader.poll()) is not None:    # never blocks; call until None (that drains the fd)
            if m.track == "video":
                packetise(m.data, m.codec, m.keyframe, m.capture_ns)   # one access unit
            else:
                payload(m.data, m.rate, m.channels, m.capture_ns)      # s16 interleaved PCM

    reader.request_keyframe("pli")                 # the peer asked: ask the video stream's producer
    reader.extradata()                             # ("h264", SPS/PPS bytes) of the video stream, or None
    reader.set(video="cam2")                       # a route change (RouteBook does it for `route`)
    reader.status()                                # per track: route, what is sent now, state, note
    reader.close()

What `poll()` hands out is a `Media`: the track, the stream it came from, the payload as
bytes (copied once out of the ring and checked against the ring's seqlock, so it is never
a torn item), codec, keyframe flag, capture_ns (CLOCK_MONOTONIC ns, one clock for every
stream of the box: RTP timestamps taken from it stay continuous across a switch), pts and
time base, picture size, audio rate/channels/samples, and `switched`: the first item of a
stream the track was just routed to (the stream's own pts jump there).

The rules, per track:
* **A video route switches on a keyframe.** After `set(video="cam2")` the reader keeps
  handing out cam's access units and reads cam2 beside them, dropping cam2's deltas, until
  cam2's next keyframe: that keyframe is the first item of cam2 handed out, and cam is let
  go. It asks cam2's producer for that keyframe at once (`Service.request_keyframe(stream,
  "route switch")`: an encoder forces an IDR, a call transport sends its peer a PLI) and
  again at most once a second while it waits. The peer never gets a delta whose reference
  it does not have: no smear.
* **A route to a stream that does not exist yet waits for it** (the status says so); the
  old stream goes on meanwhile.
* **A gate on an encoded route.** Nothing is handed out until a keyframe (at the start, and
  after any loss): an item missed on the bus (the reader fell a ring behind), an item torn
  while it was copied, a FLAG_CORRUPT item or a new producer generation close the gate and
  ask for a keyframe; deltas behind a closed gate are dropped and counted (`gated`).
* **Audio and raw pictures switch at once**: every item can start a stream, so the first
  item of the new stream is handed out and the old one is let go.
* **The wrong kind is refused.** A video track takes encoded access units (and raw pictures
  where the transport says `raw_video=True`; of the codecs it names, when it names some),
  an audio track s16 audio. `check(track, stream)` refuses a stream of the bus that is of
  the wrong kind before it is routed; an item of the wrong kind that arrives anyway is
  dropped, counted and said in the status.

Metrics (labels session, track): edgeroom_route_items (handed to the transport),
edgeroom_route_gated_items (held back waiting for a keyframe), edgeroom_route_dropped_items
(reason: missed, torn, wrong_kind, wrong_codec), edgeroom_route_switches,
edgeroom_route_keyframe_asks (reason); edgeroom_route_switch_seconds (label track): from the
route change to the first item of the new stream handed out.

The reader is not thread-safe: one owner, the service's loop.
"""
from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

import framebus
from framebus.names import check_name
from services.calls.config import AUDIO_TRACK, TRACKS, VIDEO_TRACK, Route
from services.runtime.streams import AUDIO

__all__ = ["Media", "RouteMetrics", "RouteReader", "check", "stream_kind"]

log = logging.getLogger("edgeroom.calls")

ASK_EVERY = 1.0       # seconds between two keyframe requests for the stream a track waits on


class Media(NamedTuple):
    """One item for the transport to send."""

    track: str            # "video" or "audio"
    stream: str           # the stream it came from
    data: bytes           # an access unit (as its producer put it: Annex B for H.264), a picture, or s16 PCM
    codec: str            # h264, vp8, ...; a raw picture's format (rgb24, ...); audio: "s16"
    keyframe: bool
    capture_ns: int       # CLOCK_MONOTONIC ns of its capture: one clock for every stream of the box
    pts: int
    time_base: Fraction
    width: int            # pictures and access units (0 when the producer did not say); audio: 0
    height: int
    rate: int             # audio: samples a second; video: 0
    channels: int
    samples: int
    switched: bool        # the first item of a stream this track was just routed to


class RouteMetrics:
    """The route metrics of one service (one set for all its sessions)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["session", "track"]
        self.items = Counter("edgeroom_route_items", "Items a session's route handed to its transport.", labels,
                             registry=registry)
        self.gated = Counter("edgeroom_route_gated_items", "Access units held back until a keyframe (at the "
                             "start, after a loss, while a switch waits for the new stream's keyframe).", labels,
                             registry=registry)
        self.dropped = Counter("edgeroom_route_dropped_items", "Items of a route not sent, by reason (missed on the "
                               "bus, torn while copied, wrong_kind, wrong_codec).", [*labels, "reason"],
                               registry=registry)
        self.switches = Counter("edgeroom_route_switches", "Route changes that took effect (the new stream's "
                                "first item handed out).", labels, registry=registry)
        self.asks = Counter("edgeroom_route_keyframe_asks", "Keyframe requests a route sent to a stream's "
                            "producer, by reason.", [*labels, "reason"], registry=registry)
        self.switch_seconds = Histogram("edgeroom_route_switch_seconds", "From a route change to the new stream's "
                                        "first item handed out (a keyframe, for encoded video).", ["track"],
                                        registry=registry,
                                        buckets=(.01, .02, .033, .05, .1, .2, .5, 1.0, 2.0, 5.0))


def stream_kind(prefix: str, stream: str) -> str | None:
    """The kind (video, encoded, audio) of a live stream of the bus, or None if it has no live producer."""
    for info in framebus.list_streams(prefix):
        if info.stream == stream and info.status == "alive":
            return info.kind
    return None


def _kinds(track: str, raw_video: bool) -> tuple[str, ...]:
    if track == AUDIO_TRACK:
        return ("audio",)
    return ("encoded", "video") if raw_video else ("encoded",)


def _kind_words(kind: str) -> str:
    return {"encoded": "encoded video", "video": "raw pictures", "audio": "audio"}.get(kind, kind)


def check(track: str, stream: str, prefix: str, *, raw_video: bool = False) -> None:
    """Refuse (ValueError, the reason in words) a route of `track` to `stream` that cannot be sent: a bad
    name, or a stream of the bus of the wrong kind. A stream that does not exist yet passes: it is
    waited for."""
    if track not in TRACKS:
        raise ValueError(f"a route's track is video or audio, not {track!r}")
    if stream == "":
        return
    check_name("stream", stream)
    kind = stream_kind(prefix, stream)
    wanted = _kinds(track, raw_video)
    if kind is not None and kind not in wanted:
        raise ValueError(f"stream {stream!r} carries {_kind_words(kind)}: it cannot be sent as {track} (a {track} "
                         f"route takes {' or '.join(_kind_words(k) for k in wanted)})")
    if kind is None and track == VIDEO_TRACK and stream.endswith(AUDIO):
        raise ValueError(f"stream {stream!r} is named as audio (NAME{AUDIO}): it cannot be sent as video")


def _now() -> float:
    return time.monotonic()


class _Track:
    """One outbound track: the consumer of the stream it sends, and of the one it switches to."""

    def __init__(self, reader: RouteReader, name: str) -> None:
        self.reader, self.name = reader, name
        self.kinds = _kinds(name, reader.raw_video)
        self.route = ""
        self.cur: framebus.Consumer | None = None    # what is sent
        self.cur_stream = ""
        self.nxt: framebus.Consumer | None = None    # what a route change switches to, on its first keyframe
        self.nxt_stream = ""
        self.gate_open = False
        self.fresh = False               # the next item handed out is the first of cur_stream
        self.changed_at: float | None = None   # when the route last changed, until the change takes effect
        self.asked: tuple[str, float] = ("", 0.0)    # the stream last asked for a keyframe, and when
        self.asked_at = 0.0              # when a keyframe was last asked for (for the status)
        self.encoded = False             # the stream sent carries access units (the gate applies)
        self.generation: int | None = None
        self.missed_seen = 0
        self.problem = ("", "")          # (stream, why) its items are refused (wrong kind), for the status
        m, labels = reader.metrics, (reader.session, name)
        self.m_items, self.m_gated = m.items.labels(*labels), m.gated.labels(*labels)
        self.m_switches = m.switches.labels(*labels)
        self.m_switch_s = m.switch_seconds.labels(name)
        self.items = self.gated = self.switches = 0

    # --- routing -------------------------------------------------------------------------------
    def set(self, stream: str, change: bool) -> None:
        """Route the track to `stream` ("" none). framebus.BusError if the stream cannot be read (the
        track is unchanged then)."""
        if stream == self.route:
            return
        if stream == self.cur_stream:    # back to what is being sent: the switch is off
            self._drop_next()
            self.route, self.changed_at = stream, None
            return
        consumer = self.reader.attach(stream) if stream else None   # first: a failure changes nothing
        self.route, self.changed_at = stream, _now() if change else None
        self._drop_next()
        if consumer is None:
            self._drop_current()
            return
        if self.cur is None or not self.gate_open:   # nothing flows now: nothing to keep sending meanwhile
            self._drop_current()
            self.cur, self.cur_stream = consumer, stream
            self.fresh, self.generation, self.missed_seen = True, None, 0
        else:
            self.nxt, self.nxt_stream = consumer, stream
        if self.name == VIDEO_TRACK:
            self.ask(stream, "route switch" if change else "route start")

    def _drop_next(self) -> None:
        if self.nxt is not None:
            self.reader.detach(self.nxt)
        self.nxt, self.nxt_stream = None, ""

    def _drop_current(self) -> None:
        if self.cur is not None:
            self.reader.detach(self.cur)
        self.cur, self.cur_stream, self.gate_open = None, "", False

    def close(self) -> None:
        self._drop_next()
        self._drop_current()

    def ask(self, stream: str, reason: str, force: bool = False) -> None:
        """Ask `stream`'s producer for a keyframe; at most once a second per stream unless forced."""
        now = _now()
        if not force and self.asked[0] == stream and now - self.asked[1] < ASK_EVERY:
            return
        # a stream with no producer yet cannot be asked: its first delta asks again, unthrottled
        waiting = (self.nxt if stream == self.nxt_stream else self.cur) if stream else None
        self.asked = (stream, now if waiting is not None and waiting.attached else 0.0)
        self.asked_at = now
        self.reader.metrics.asks.labels(self.reader.session, self.name, reason).inc()
        self.reader.ask(stream, reason)

    # --- reading -------------------------------------------------------------------------------
    def next(self) -> Media | None:
        if self.nxt is not None:
            media = self._from_next()
            if media is not None:
                return media
        cur = self.cur
        if cur is None:
            return None
        while (item := cur.poll()) is not None:
            media = self._from_current(cur, item)
            if media is not None:
                return media
        self._lost(cur)  # items overwritten while we looked for the next one
        return None

    def _from_next(self) -> Media | None:
        nxt = self.nxt
        while nxt is not None and (item := nxt.poll()) is not None:
            if not self._fits(item, self.nxt_stream):
                continue
            if item.kind == "encoded" and not item.keyframe:
                self._gate(self.nxt_stream, "route switch")
                continue
            media = self._media(item, self.nxt_stream, True)
            if media is None:  # torn: wait for the next keyframe
                continue
            self._drop_current()
            self.cur, self.cur_stream, self.nxt, self.nxt_stream = nxt, self.nxt_stream, None, ""
            self.gate_open, self.fresh, self.generation, self.missed_seen = True, False, item.generation, nxt.missed
            self.encoded = item.kind == "encoded"
            self._took_effect()
            return media
        return None

    def _from_current(self, cur: framebus.Consumer, item: framebus.Item) -> Media | None:
        if not self._fits(item, self.cur_stream):
            return None
        self.encoded = item.kind == "encoded"
        if item.generation != self.generation:
            if self.generation is not None:
                self._close_gate("a new producer of the stream")
            self.generation, self.missed_seen = item.generation, cur.missed
        self._lost(cur)
        encoded = item.kind == "encoded"
        if encoded and item.flags & framebus.FLAG_CORRUPT:
            self._close_gate("damaged access unit")
        if encoded and not self.gate_open:
            if not item.keyframe:
                self._gate(self.cur_stream, "gate")
                return None
        media = self._media(item, self.cur_stream, self.fresh)
        if media is None:
            self._close_gate("an item overwritten while it was copied")
            return None
        if self.fresh and self.changed_at is not None:
            self._took_effect()
        self.gate_open, self.fresh = True, False
        return media

    def _took_effect(self) -> None:
        if self.changed_at is not None:
            self.switches += 1
            self.m_switches.inc()
            self.m_switch_s.observe(_now() - self.changed_at)
            self.changed_at = None

    def _lost(self, cur: framebus.Consumer) -> None:
        missed = cur.missed - self.missed_seen
        if missed > 0:
            self.missed_seen = cur.missed
            self.reader.metrics.dropped.labels(self.reader.session, self.name, "missed").inc(missed)
            self._close_gate(f"{missed} item(s) missed on the bus")

    def _close_gate(self, why: str) -> None:
        if self.gate_open and self.encoded:
            self.gate_open = False
            self.reader.throttled(f"{self.reader.session} {self.name}: {why}; waiting for a keyframe of "
                                  f"{self.cur_stream}")
            self.ask(self.cur_stream, "loss", force=True)

    def _gate(self, stream: str, reason: str) -> None:
        self.gated += 1
        self.m_gated.inc()
        self.ask(stream, reason)

    def _fits(self, item: framebus.Item, stream: str) -> bool:
        kind = item.kind
        if kind not in self.kinds:
            self._refuse(stream, "wrong_kind", f"{stream} carries {_kind_words(kind)}, not what a {self.name} "
                                               f"route takes ({' or '.join(_kind_words(k) for k in self.kinds)})")
            return False
        codecs = self.reader.video_codecs
        if kind == "encoded" and codecs and item.codec not in codecs:
            self._refuse(stream, "wrong_codec", f"{stream} carries {item.codec}; this transport sends "
                                                f"{', '.join(codecs)}")
            return False
        if self.problem[0] == stream:
            self.problem = ("", "")
        return True

    def _refuse(self, stream: str, reason: str, why: str) -> None:
        self.reader.metrics.dropped.labels(self.reader.session, self.name, reason).inc()
        if (stream, why) != self.problem:
            self.problem = (stream, why)
            log.warning("%s %s route: %s: nothing of it is sent", self.reader.session, self.name, why)

    def _media(self, item: framebus.Item, stream: str, switched: bool) -> Media | None:
        """The item as Media: one copy of its payload, checked against the ring's seqlock (None if torn)."""
        kind = item.kind
        codec = item.codec if kind == "encoded" else item.format if kind == "video" else "s16"
        media = Media(self.name, stream, item.array.tobytes(), codec or "", item.keyframe, item.capture_ns, item.pts,
                      item.time_base, item.width, item.height, item.rate, item.channels, item.samples, switched)
        if not item.valid():
            self.reader.metrics.dropped.labels(self.reader.session, self.name, "torn").inc()
            return None
        self.items += 1
        self.m_items.inc()
        return media

    # --- status --------------------------------------------------------------------------------
    def state(self) -> tuple[str, str]:
        """(state, note): off, sending, switching, waiting or refused, and the words that go with it."""
        if not self.route:
            return "off", f"no {self.name} route"
        ago = f"asked {_now() - self.asked_at:.2f} s ago" if self.asked_at else "not asked yet"
        refused, why = self.problem
        if self.nxt is not None:
            if refused == self.nxt_stream:
                return "switching", f"sending {self.cur_stream}; cannot switch: {why}"
            if not self.nxt.attached:
                return "switching", f"sending {self.cur_stream} until {self.nxt_stream} exists"
            return "switching", f"sending {self.cur_stream} until {self.nxt_stream}'s next keyframe ({ago})"
        if refused and refused == self.cur_stream:
            return "refused", why
        if self.cur is None or not self.cur.attached:
            return "waiting", f"waiting for stream {self.route} (no producer yet)"
        if not self.gate_open:
            what = f"a keyframe of {self.cur_stream} ({ago})" if self.encoded or self.name == VIDEO_TRACK else \
                f"the first item of {self.cur_stream}"
            return "waiting", f"waiting for {what}"
        return "sending", f"sending {self.cur_stream}"

    def status(self) -> dict[str, Any]:
        state, note = self.state()
        sending = self.cur_stream if self.gate_open else ""
        return {"route": self.route, "sending": sending, "state": state, "note": note, "items": self.items,
                "gated": self.gated, "switches": self.switches}


class RouteReader:
    """The outbound tracks of one session, read off the bus (see the module's docstring)."""

    def __init__(self, session: str, route: Route, *, prefix: str, ask: Callable[[str, str], None],
                 metrics: RouteMetrics, video_codecs: tuple[str, ...] = (), raw_video: bool = False,
                 warn: Callable[[str], None] | None = None) -> None:
        """`ask(stream, reason)` asks a stream's producer for a keyframe (Service.request_keyframe);
        `video_codecs` the codecs the transport can send ((): any); `raw_video` whether it sends raw
        pictures too; `warn(text)` logs a recurring problem (a Throttled logger)."""
        self.session, self.prefix, self.ask, self.metrics = session, prefix, ask, metrics
        self.video_codecs, self.raw_video = video_codecs, raw_video
        self.throttled = warn or log.warning
        self._epoll = select.epoll()
        self._tracks = {name: _Track(self, name) for name in TRACKS}
        self._order = (self._tracks[VIDEO_TRACK], self._tracks[AUDIO_TRACK])
        self._turn = 0
        for name in TRACKS:
            self._tracks[name].set(route.of(name), change=False)

    # --- the transport's side ------------------------------------------------------------------
    def fileno(self) -> int:
        """Readable when a track has news; the same fd for the reader's whole life."""
        return self._epoll.fileno()

    def poll(self) -> Media | None:
        """The next item to send, from either track in turn, or None; never blocks."""
        for _ in range(2):
            track = self._order[self._turn]
            self._turn ^= 1
            media = track.next()
            if media is not None:
                return media
        return None

    def request_keyframe(self, reason: str) -> None:
        """The peer needs a keyframe (its PLI or FIR): ask the producer of the video stream being sent."""
        video = self._tracks[VIDEO_TRACK]
        stream = video.cur_stream or video.route
        if stream:
            video.ask(stream, reason)

    def extradata(self) -> tuple[str, bytes] | None:
        """(codec, parameter sets) of the video stream being sent, as its producer set them, or None."""
        cur = self._tracks[VIDEO_TRACK].cur
        return None if cur is None else cur.extradata()

    @property
    def route(self) -> Route:
        """The route as asked for (what is sent may still be the previous stream: see status())."""
        return Route(self._tracks[VIDEO_TRACK].route, self._tracks[AUDIO_TRACK].route)

    def set(self, video: str | None = None, audio: str | None = None) -> None:
        """Change the route of a track (None leaves it; "" sends nothing). Both are checked first (ValueError:
        a bad name, a stream of the wrong kind); framebus.BusError if a stream cannot be read (its track is
        left as it was)."""
        for name, stream in ((VIDEO_TRACK, video), (AUDIO_TRACK, audio)):
            if stream is not None:
                check(name, stream, self.prefix, raw_video=self.raw_video)
        for name, stream in ((VIDEO_TRACK, video), (AUDIO_TRACK, audio)):
            if stream is not None:
                self._tracks[name].set(stream, change=True)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per track: route, sending (the stream the peer gets now), state, note, items, gated, switches."""
        return {name: t.status() for name, t in self._tracks.items()}

    def tracks(self) -> list[dict[str, Any]]:
        """The session's outbound tracks for its heartbeat (one per track with a route)."""
        out = []
        for name, t in self._tracks.items():
            if t.route:
                out.append({"id": f"send-{name}", "kind": name, "direction": "send", "stream": t.route,
                            "state": t.state()[0]})
        return out

    def accepts(self) -> dict[str, Any]:
        """What this session's tracks can send, for its heartbeat (the bridge routes by it): the video codecs
        (empty: any encoded video), whether raw pictures, and the audio format."""
        return {"video": list(self.video_codecs), "raw_video": self.raw_video, "audio": ["s16"]}

    def summary(self) -> str:
        """One line for a service's status."""
        return "; ".join(f"{name} {t.state()[1]}" for name, t in self._tracks.items() if t.route) or "sends nothing"

    def close(self) -> None:
        for t in self._tracks.values():
            t.close()
        self._epoll.close()

    # --- the tracks' side ----------------------------------------------------------------------
    def attach(self, stream: str) -> framebus.Consumer:
        consumer = framebus.Consumer.attach(stream, prefix=self.prefix, missing_ok=True, start="next")
        self._epoll.register(consumer.fileno(), select.EPOLLIN)
        return consumer

    def detach(self, consumer: framebus.Consumer) -> None:
        self._epoll.unregister(consumer.fileno())
        consumer.close()
