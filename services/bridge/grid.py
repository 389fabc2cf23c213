"""The composed grid: N streams of the bus as tiles of one picture, encoded as one stream, for a peer that takes
one video stream.

    g = Grid("room-grid", "vp8", prefix=prefix, registry=registry, log=log, ask_keyframe=service.request_keyframe)
    g.set_sources(["cam1", "cam2", "door"])      # attach / detach; the order is the tiles' (row by row)
    loop.add_reader(g.fileno(), g.pump)          # one fd for the grid's life (g.fds() == [g.fileno()])
    loop.every(1 / g.fps, g.tick)                # compose the newest picture of each source, encode one frame
    g.keyframe("pli")                            # the next frame is a keyframe (an IDR in H.264)
    g.status()
    g.close()

Sources: encoded streams (H.264, VP8, ... decoded by services/bridge/transcode.py's `SourceReader`: the
keyframe gate, keyframe requests to the source's producer after a loss or a decode error, at most once a
second) or raw pictures (only the newest waiting is taken). Every access unit of a source is decoded (the
references need it); only the newest picture is kept, and it is scaled into its tile at the next tick, once.

Layout, by the number of sources (at most MAX_TILES shown; the rest are listed in status() as hidden and not
read): 1: 1x1; 2: 2x1 side by side (1x2 stacked when the picture is taller than wide); 3-4: 2x2; 5-9: 3x3.
Tiles are equal, even-sized, the grid centred; a picture is fitted into its tile keeping its aspect ratio
(the bars dark). A source without a picture yet is a dark tile (limited-range black), a source that stops or
goes away keeps its last picture. The output is `width` x `height` (default 640x360), encoded (h264 or vp8,
services/bridge/transcode.py's `Output`: choose() + Encoder + Sink, SPS/PPS before every IDR) at every
`tick()`: the service calls it on a steady clock, `fps` times a second, whether or not a source has news.
Each access unit carries the tick's CLOCK_MONOTONIC time as capture_ns and as its pts (time base 1/1e9).

Composition is numpy slices and FFmpeg's swscale (`VideoFrame.reformat`) per changed tile: no Python loop
over pixels. Nothing blocks: `pump()` decodes at most BATCH_ITEMS items per source or BATCH_SECONDS in all,
and keeps its fd readable when more waits. Metrics: edgeroom_bridge_grid_* (transcode.py's `MediaMetrics`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import av
import numpy as np
from prometheus_client import CollectorRegistry

from framebus.names import check_name
from services.bridge.transcode import (
    BATCH_ITEMS,
    BATCH_SECONDS,
    DARK_Y,
    NEUTRAL,
    MediaMetrics,
    Meta,
    Output,
    SourceReader,
    Wake,
    now_ns,
)
from services.encode.encoder import TIME_BASE
from services.encode.pictures import FramePool

__all__ = ["MAX_TILES", "Grid", "fit", "layout"]

MAX_TILES = 9
HOUSEKEEPING_S = 1.0       # heartbeat, dead producers, gauges: at most this often, from tick()
NS = Fraction(1, 1_000_000_000)

Rect = tuple[int, int, int, int]   # x, y, width, height


def grid_shape(n: int, width: int, height: int) -> tuple[int, int]:
    """(columns, rows) for n tiles."""
    if n <= 1:
        return 1, 1
    if n == 2:
        return (2, 1) if width >= height else (1, 2)
    if n <= 4:
        return 2, 2
    return 3, 3


def layout(n: int, width: int, height: int) -> list[Rect]:
    """The tiles of n sources (at most MAX_TILES) in a width x height picture: equal, even-sized, centred."""
    n = min(n, MAX_TILES)
    cols, rows = grid_shape(n, width, height)
    tw, th = (width // cols) & ~1, (height // rows) & ~1
    x0, y0 = ((width - tw * cols) // 2) & ~1, ((height - th * rows) // 2) & ~1
    return [(x0 + (i % cols) * tw, y0 + (i // cols) * th, tw, th) for i in range(n)]


def fit(width: int, height: int, tile_w: int, tile_h: int) -> Rect:
    """A width x height picture fitted into a tile, aspect ratio kept: (x, y, w, h) inside the tile, all even."""
    scale = min(tile_w / width, tile_h / height)
    w = max(2, min(tile_w, round(width * scale / 2) * 2))
    h = max(2, min(tile_h, round(height * scale / 2) * 2))
    return ((tile_w - w) // 2) & ~1, ((tile_h - h) // 2) & ~1, w, h


def _plane(frame: av.VideoFrame, i: int, rows: int, cols: int) -> np.ndarray:
    """A read-only view of plane i of an FFmpeg frame, rows x cols bytes."""
    p = frame.planes[i]
    return np.ndarray((rows, cols), np.uint8, buffer=memoryview(p), strides=(p.line_size, 1))


class _Tile:
    """One source: its reader, and the newest picture it gave."""

    __slots__ = ("dirty", "frame", "reader")

    def __init__(self, reader: SourceReader) -> None:
        self.reader = reader
        self.frame: av.VideoFrame | None = None
        self.dirty = False

    def picture(self, frame: av.VideoFrame, meta: Meta) -> None:
        """The reader's newest picture: drawn at the next tick."""
        self.frame, self.dirty = frame, True


class Grid:
    """Sources composed into one picture, encoded on a steady clock (module docstring).

    The service: `set_sources(list)`, `loop.add_reader(g.fileno(), g.pump)` (or each of `g.fds()`: one fd),
    `loop.every(1 / fps, g.tick)`, `g.keyframe(reason)` from its keyframe offer for `out`, `g.close()`.
    `on_keyframe`: told (with `out`) when a keyframe goes onto the bus."""

    def __init__(self, out: str, codec: str, *, prefix: str, registry: CollectorRegistry, log: Any,
                 ask_keyframe: Callable[[str, str], None], width: int = 640, height: int = 360, fps: float = 15.0,
                 kbps: int = 800, encoder: str = "auto", gop_s: float = 2.0, decoder: str = "off") -> None:
        if width < 16 or height < 16 or width % 2 or height % 2:
            raise ValueError(f"grid size {width}x{height}: use even sizes of at least 16x16")
        if fps <= 0:
            raise ValueError(f"grid fps {fps}: must be above 0")
        self.out, self.codec, self.prefix = check_name("stream", out), codec, prefix
        self.width, self.height, self.fps = width, height, fps
        self.log, self.ask_keyframe, self.decoder = log, ask_keyframe, decoder
        self.m = MediaMetrics.of(registry, "grid")
        self._decode_s = self.m.decode_seconds.labels(out)
        self.output = Output(out, codec, prefix=prefix, kbps=kbps, gop_s=gop_s, encoder=encoder, fps=fps, log=log,
                             metrics=self.m)
        self._wake = Wake()
        self.tiles: dict[str, _Tile] = {}
        self.sources: list[str] = []       # as set, in tile order
        self.rects: list[Rect] = layout(0, width, height)
        self._redraw = True                # the layout changed: every tile drawn again
        # the composed picture (I420), kept between ticks: only tiles with a new picture are drawn again
        self.y = np.full((height, width), DARK_Y, np.uint8)
        self.u = np.full((height // 2, width // 2), NEUTRAL, np.uint8)
        self.v = np.full((height // 2, width // 2), NEUTRAL, np.uint8)
        self.pool = FramePool("yuv420p", width, height, TIME_BASE)
        self.ticks = 0
        self._turn = 0
        self._house = time.monotonic()
        self._seen: dict[str, int] = {}
        self._closed = False

    @property
    def on_keyframe(self) -> Callable[[str], None] | None:
        return self.output.on_keyframe

    @on_keyframe.setter
    def on_keyframe(self, callback: Callable[[str], None] | None) -> None:
        self.output.on_keyframe = callback

    # ------------------------------------------------------------ sources
    @property
    def shown(self) -> list[str]:
        return self.sources[:MAX_TILES]

    def set_sources(self, sources: list[str]) -> None:
        """The streams shown, in tile order: new ones attached (they need not exist yet), dropped ones let go,
        kept ones keep their reader and their picture. ValueError (nothing changed) for a bad name."""
        sources = [check_name("stream", s) for s in sources]
        if self.out in sources:
            raise ValueError(f"grid {self.out!r} cannot show its own output")
        wanted = list(dict.fromkeys(sources[:MAX_TILES]))
        self._sync()  # what the readers counted so far is in the metrics before any of them goes
        for name in [n for n in self.tiles if n not in wanted]:
            tile = self.tiles.pop(name)
            self._wake.remove(tile.reader.fileno())
            tile.reader.close()
        for name in wanted:
            if name not in self.tiles:
                reader = SourceReader(name, prefix=self.prefix, ask_keyframe=self.ask_keyframe, log=self.log,
                                      decoder=self.decoder, newest_raw=True, observe=self._decode_s.observe)
                self.tiles[name] = _Tile(reader)
                self._wake.add(reader.fileno())
        if sources != self.sources:
            self.log.info("grid %s: %s", self.out, ", ".join(sources) or "no sources")
            if len(sources) > MAX_TILES:
                self.log.warning("grid %s shows %d sources at most; not shown: %s", self.out, MAX_TILES,
                                 ", ".join(sources[MAX_TILES:]))
        before = self.shown
        self.sources = sources
        rects = layout(len(self.shown), self.width, self.height)
        if rects != self.rects or self.shown != before:  # every tile drawn again, the rest dark
            self.rects, self._redraw = rects, True
        if self.m.sources is not None:
            self.m.sources.labels(self.out).set(len(self.shown))
        self._wake.again()  # a new source may already have items

    # ------------------------------------------------------------ input
    def fileno(self) -> int:
        """Readable when a source has items (or work was left over); the same fd for the grid's life."""
        return self._wake.epoll.fileno()

    def fds(self) -> list[int]:
        return [self.fileno()]

    def pump(self) -> None:
        """Decode what the sources have, keeping each one's newest picture; never blocks."""
        if self._closed:
            return
        self._wake.clear()
        deadline = time.monotonic() + BATCH_SECONDS
        names = list(self.tiles)
        more = False
        if names:
            self._turn = (self._turn + 1) % len(names)
            for name in names[self._turn:] + names[: self._turn]:  # in turn: no source starves the others
                if time.monotonic() >= deadline:
                    more = True
                    break
                tile = self.tiles[name]
                more |= tile.reader.read(tile.picture, deadline, BATCH_ITEMS)
        self._sync()
        if more:
            self._wake.again()

    # ------------------------------------------------------------ output
    def tick(self) -> None:
        """Compose the newest picture of each source and encode one frame (call it `fps` times a second)."""
        if self._closed:
            return
        t0 = time.perf_counter()
        if self._redraw:
            self.y.fill(DARK_Y)
            self.u.fill(NEUTRAL)
            self.v.fill(NEUTRAL)
        for name, rect in zip(self.shown, self.rects):
            tile = self.tiles.get(name)
            if tile is not None and (self._redraw or tile.dirty):
                self._draw(rect, tile.frame)
        for tile in self.tiles.values():
            tile.dirty = False
        self._redraw = False
        frame = self.pool.next()
        y, u, v = frame.planes
        np.copyto(y, self.y)
        np.copyto(u, self.u)
        np.copyto(v, self.v)
        if self.m.compose_seconds is not None:
            self.m.compose_seconds.labels(self.out).observe(time.perf_counter() - t0)
        t = now_ns()
        self.output.encode(frame.av, Meta(t, NS, t))
        self.ticks += 1
        if time.monotonic() - self._house >= HOUSEKEEPING_S:
            self._housekeeping()

    def _draw(self, rect: Rect, picture: av.VideoFrame | None) -> None:
        x, y, tw, th = rect
        self.y[y: y + th, x: x + tw] = DARK_Y
        self.u[y // 2: (y + th) // 2, x // 2: (x + tw) // 2] = NEUTRAL
        self.v[y // 2: (y + th) // 2, x // 2: (x + tw) // 2] = NEUTRAL
        if picture is None:
            return
        ox, oy, w, h = fit(picture.width, picture.height, tw, th)
        small = picture.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")  # swscale
        x, y = x + ox, y + oy
        np.copyto(self.y[y: y + h, x: x + w], _plane(small, 0, h, w))
        np.copyto(self.u[y // 2: (y + h) // 2, x // 2: (x + w) // 2], _plane(small, 1, h // 2, w // 2))
        np.copyto(self.v[y // 2: (y + h) // 2, x // 2: (x + w) // 2], _plane(small, 2, h // 2, w // 2))

    def _housekeeping(self) -> None:
        self._house = time.monotonic()
        for tile in self.tiles.values():
            tile.reader.check(tile.picture)
        if any(not tile.reader.consumer.attached for tile in self.tiles.values()):
            self.pump()  # look for the sources not there yet (their producers also wake fileno())
        self._sync()
        self.output.tick()

    def _sync(self) -> None:
        """The readers' counters into the metrics (summed over the sources)."""
        readers = [t.reader for t in self.tiles.values()]
        s, out = self._seen, self.out
        totals = {"in": sum(r.frames_in for r in readers), "pictures": sum(r.pictures for r in readers),
                  "errors": sum(r.errors for r in readers), "asks": sum(r.asks for r in readers)}
        metrics = {"in": self.m.frames_in, "pictures": self.m.pictures, "errors": self.m.decode_errors,
                   "asks": self.m.asks}
        for name, value in totals.items():
            if value > s.get(name, 0):
                metrics[name].labels(out).inc(value - s.get(name, 0))
            s[name] = value
        dropped: dict[str, int] = {}
        for r in readers:
            for reason, n in r.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + n
        for key in [k for k in s if k.startswith("dropped:") and k[8:] not in dropped]:
            s[key] = 0  # only readers let go had counted it
        for reason, n in dropped.items():
            key = "dropped:" + reason
            if n > s.get(key, 0):
                self.m.dropped.labels(out, reason).inc(n - s.get(key, 0))
            s[key] = n  # lower when a reader was let go: counted from there on

    # ------------------------------------------------------------ keyframes and state
    def keyframe(self, reason: str = "") -> dict[str, Any]:
        """The next frame is an IDR (a VP8 key frame); the answer for the hub's keyframe command."""
        self.log.info("keyframe of %s asked for%s", self.out, f" ({reason})" if reason else "")
        return self.output.force_keyframe()

    def status(self) -> dict[str, Any]:
        o = self.output.status()
        cols, rows = grid_shape(len(self.shown), self.width, self.height)
        sources = []
        for name, rect in zip(self.shown, self.rects):
            tile = self.tiles[name]
            st = tile.reader.status()
            st["tile"] = list(rect)
            st["has_picture"] = tile.frame is not None
            sources.append(st)
        dropped: dict[str, int] = dict(self.output.dropped)
        for s in sources:
            for reason, n in s["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        return {"out": self.out, "codec": self.codec, "encoder": o["encoder"], "hardware": o["hardware"],
                "encoder_note": o["encoder_note"], "size": f"{self.width}x{self.height}", "fps": self.fps,
                "layout": f"{cols}x{rows}" if self.shown else "empty", "sources": sources,
                "hidden": self.sources[MAX_TILES:], "ticks": self.ticks, "frames_out": o["frames_out"],
                "keyframes_out": o["keyframes_out"], "kbps": o["kbps"], "target_kbps": o["target_kbps"],
                "frames_in": sum(s["frames_in"] for s in sources),
                "decode_errors": sum(s["decode_errors"] for s in sources), "encode_errors": o["encode_errors"],
                "dropped": dropped, "keyframe_pending": o["keyframe_pending"]}

    def close(self) -> None:
        """Stop: the output stream is removed, the sources let go, the metrics' series dropped."""
        if self._closed:
            return
        self._closed = True
        for tile in self.tiles.values():
            self._wake.remove(tile.reader.fileno())
            tile.reader.close()
        self.tiles.clear()
        self.output.close()
        self._wake.close()
        self.m.forget(self.out)
