"""The screen source: an X display (or part of it) grabbed with mss, straight into a bus slot.

    src = ScreenSource(monitor=1, region=(0, 0, 1280, 720), scale=0.5, threshold=0.001)
    src.on_state(lambda event, info: ...)        # ON_SCREEN_SHARE_STARTED / STOPPED
    w, h = src.size                              # even: what the bus and encoders want
    loan = producer.loan_picture(w, h, "rgb24")
    if src.grab_into(loan.array):                # False: unchanged since the last emitted frame
        loan.send(...)
    else:
        loan.abort()

What one grab costs, and why it is done this way:

* mss asks the X server for exactly the monitor/region rectangle (the server crops), and
  hands back one new BGRA bytearray. That bytearray is the only per-frame allocation, and
  it is mss's: its public API has no "grab into this buffer".
* Skipping compares that bytearray with the bytearray of the last EMITTED frame, which is
  simply kept (mss never reuses it), so remembering a frame costs no copy. The measure is
  the fraction of pixels whose value changed at all, over every pixel of the frame: a
  blinking text cursor is a tiny fraction, a scrolled page a large one, whatever the colours.
  (A mean absolute difference would call a small high-contrast change and a large faint one
  equal; area is what matters for "is anything worth sending".) First `==` on the two
  bytearrays — a memcmp that stops at the first difference — settles the common case, an
  idle screen, at memory speed; only frames that differ are counted exactly, with
  `np.not_equal` on uint32 views (one pixel each) into a reused bool buffer and
  `np.count_nonzero`. At 1920x1080 on the 2-core build machine (`python -m
  services.capture.screen --bench`): 0.2 ms for an identical frame, 0.5 ms with 1% changed
  (both frames in cache; up to ~0.7 ms when the old one has left it), where the int16 mean
  takes ~10 ms. Memory bandwidth is the limit: the two frames are 16 MB.
* Colour conversion and scaling write into the caller's array (the loaned slot) through
  OpenCV's `dst=`: BGRA -> RGB/BGR directly at scale 1; at scale < 1 first `cv2.resize`
  with INTER_AREA (exact area averaging for any factor, not integer strides) into a
  preallocated 4-channel scratch, then the conversion of that small picture into `dst`.

Share state: ON_SCREEN_SHARE_STARTED fires when the first frame after open is emitted,
ON_SCREEN_SHARE_STOPPED once, on `close()` or when the display goes away. A display that
vanishes (X server gone: mss/XCB errors) makes that grab and every later one raise
`ScreenGone` with the display name and the cause — without touching mss again, so a caller
that retries too eagerly gets a cheap, clear error rather than a crash loop; to resume it
opens a new `ScreenSource`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import numpy as np

from services.capture.sources.base import Emit, SourceConfig, SourceError, source_kind
from services.runtime.schema import RESTART, setting

__all__ = ["SHARE_STARTED", "SHARE_STOPPED", "Monitor", "ScreenGone", "ScreenSource", "changed_pixels", "out_size"]

SHARE_STARTED, SHARE_STOPPED = "ON_SCREEN_SHARE_STARTED", "ON_SCREEN_SHARE_STOPPED"
_CONVERT = {"rgb24": "COLOR_BGRA2RGB", "bgr24": "COLOR_BGRA2BGR"}  # OpenCV's codes, by name: cv2 loads on use

log = logging.getLogger("edgeroom.capture.screen")

StateCallback = Callable[[str, dict], None]


class ScreenGone(RuntimeError):
    """The X display cannot be opened, or went away while grabbing."""


class Monitor(NamedTuple):
    index: int      # 0 = all monitors together (mss's convention)
    left: int
    top: int
    width: int
    height: int

    def describe(self) -> str:
        what = "all monitors" if self.index == 0 else f"monitor {self.index}"
        return f"{what} ({self.width}x{self.height} at {self.left},{self.top})"


def out_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The output size for a (width, height) source at `scale`: the nearest even size, never
    larger than the source rounded down to even (an odd source at scale 1 loses its last
    column/row rather than being stretched by one pixel)."""
    def one(n: int) -> int:
        return max(2, min(n & ~1, 2 * int(n * scale / 2 + 0.5)))
    return one(width), one(height)


def changed_pixels(cur: bytearray | bytes, last: bytearray | bytes, scratch: np.ndarray) -> int:
    """How many 4-byte pixels differ between two same-size BGRA buffers, over all of them.

    `==` first (memcmp, stops at the first difference, no output written): identical frames
    — an idle screen, the case skipping exists for — cost one read of each. Otherwise an
    exact count, one uint32 compare per pixel into `scratch` (bool, len(cur) // 4, reused).
    """
    if cur == last:
        return 0
    a = np.frombuffer(cur, np.uint32)
    b = np.frombuffer(last, np.uint32)
    np.not_equal(a, b, out=scratch)
    return int(np.count_nonzero(scratch))


class ScreenSource:
    """One monitor (or a region of it) of an X display, as raw pictures of a fixed size.

    monitor:   mss index; 0 = all monitors together, 1.. = each monitor.
    region:    (x, y, w, h) relative to the monitor's top-left corner; None = all of it.
    scale:     any factor in (0, 1]; the output is `size` (even width and height).
    threshold: skip a frame when the fraction of its pixels that changed since the last
               EMITTED frame is below this, in [0, 1]. 0 = never skip (no comparison is
               made); any value below 1/pixels (say 1e-9) = skip only identical frames;
               0.01 = skip frames with less than 1% of the pixels changed.
    fmt:       "rgb24" or "bgr24", what `grab_into` writes.
    display:   X display name; None = $DISPLAY.
    """

    def __init__(self, monitor: int = 0, region: tuple[int, int, int, int] | None = None, scale: float = 1.0,
                 threshold: float = 0.0, fmt: str = "rgb24", display: str | None = None) -> None:
        if fmt not in _CONVERT:
            raise ValueError(f"fmt must be one of {', '.join(_CONVERT)}, not {fmt!r}")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], not {scale!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (a fraction of the pixels), not {threshold!r}")
        self.fmt, self.scale, self.threshold = fmt, float(scale), float(threshold)
        self.display = display if display is not None else os.environ.get("DISPLAY", "")
        self._callbacks: list[StateCallback] = []
        self._sct = self._open()
        try:
            self._monitors = self._read_monitors()
            self.monitor = self._pick(monitor)
            self.rect = self._crop(self.monitor, region)
        except BaseException:
            self._sct.close()
            raise
        x, y, w, h = self.rect
        self._grab_box = {"left": x, "top": y, "width": w, "height": h}
        self.size = out_size(w, h, self.scale)
        ow, oh = self.size
        # at scale 1 the picture is the grab itself (cropped to even); otherwise a resize
        self._resize = (ow, oh) != (w & ~1, h & ~1)
        self._small = np.empty((oh, ow, 4), np.uint8) if self._resize else None
        import cv2  # the media extra: here, not at import, so the config of a screen source loads without it
        self._cv2 = cv2
        self._code = getattr(cv2, _CONVERT[fmt])
        self._pixels = w * h
        # skip iff changed < limit; a positive threshold below one pixel means "identical only"
        self._limit = max(1.0, threshold * self._pixels) if threshold > 0 else 0.0
        self._neq = np.empty(self._pixels, np.bool_) if threshold > 0 else None
        self._last: bytearray | None = None   # the last emitted grab, kept as mss returned it
        self.emitted = 0
        self.skipped = 0
        self.change: float | None = None      # fraction of pixels changed, for the last grab compared
        self.started = False
        self.closed = False
        self.gone: str | None = None          # why the display is gone, once it is

    # -- opening -------------------------------------------------------------------------

    def _open(self):
        import mss  # here, not at import: a box without X libraries can still import the module
        try:
            return mss.MSS(display=self.display or None)
        except Exception as e:
            raise ScreenGone(f"cannot open X display {self.display or '(DISPLAY unset)'}: {e}") from e

    def _read_monitors(self) -> list[Monitor]:
        try:
            mons = self._sct.monitors
        except Exception as e:
            raise ScreenGone(f"cannot list the monitors of X display {self.display}: {e}") from e
        return [Monitor(i, m["left"], m["top"], m["width"], m["height"]) for i, m in enumerate(mons)]

    def monitors(self) -> list[Monitor]:
        """Every monitor, index 0 being all of them together."""
        return list(self._monitors)

    def _pick(self, index: int) -> Monitor:
        if not isinstance(index, int) or not 0 <= index < len(self._monitors):
            listing = "; ".join(m.describe() for m in self._monitors)
            raise ValueError(f"no monitor {index!r} on X display {self.display}: there are {listing}")
        return self._monitors[index]

    @staticmethod
    def _crop(mon: Monitor, region: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
        """The absolute rectangle to grab: the region checked against the monitor."""
        if region is None:
            x, y, w, h = 0, 0, mon.width, mon.height
        else:
            try:
                x, y, w, h = (int(v) for v in region)
            except (TypeError, ValueError):
                raise ValueError(f"region must be (x, y, width, height), not {region!r}") from None
            if w < 2 or h < 2 or x < 0 or y < 0 or x + w > mon.width or y + h > mon.height:
                raise ValueError(f"region (x={x}, y={y}, w={w}, h={h}) is not inside {mon.describe()}: it must "
                                 f"be at least 2x2 and lie within 0..{mon.width} x 0..{mon.height}")
        if w < 2 or h < 2:
            raise ValueError(f"{mon.describe()} is too small to capture")
        return mon.left + x, mon.top + y, w, h

    # -- state ---------------------------------------------------------------------------

    def on_state(self, callback: StateCallback) -> None:
        """Call `callback(event, info)` on ON_SCREEN_SHARE_STARTED / ON_SCREEN_SHARE_STOPPED."""
        self._callbacks.append(callback)

    def _fire(self, event: str, **extra) -> None:
        x, y, w, h = self.rect
        info = {"display": self.display, "monitor": self.monitor.index, "rect": (x, y, w, h),
                "size": self.size, "fmt": self.fmt, "emitted": self.emitted, "skipped": self.skipped, **extra}
        for cb in list(self._callbacks):
            try:
                cb(event, info)
            except Exception:  # a broken listener must not stop the capture
                log.exception("screen share %s listener failed", event)

    def _stop(self, reason: str) -> None:
        """STOPPED once, and only after STARTED: the two always pair up."""
        if self.started:
            self.started = False
            self._fire(SHARE_STOPPED, reason=reason)

    # -- grabbing ------------------------------------------------------------------------

    def grab_into(self, dst: np.ndarray) -> bool:
        """Grab one frame into `dst` ((h, w, 3) uint8 of `size`, the loaned slot).

        True if the frame was emitted (written into dst); False if it was skipped as
        unchanged since the last emitted frame (dst untouched). Raises ScreenGone when the
        display is gone, RuntimeError after close().
        """
        if self.gone is not None:
            raise ScreenGone(self.gone)
        if self.closed:
            raise RuntimeError("screen source is closed")
        ow, oh = self.size
        if dst.shape != (oh, ow, 3) or dst.dtype != np.uint8:
            raise ValueError(f"dst must be ({oh}, {ow}, 3) uint8 for {self.fmt}, not {dst.shape} {dst.dtype}")
        try:
            raw = self._sct.grab(self._grab_box).raw
        except Exception as e:  # XCB reports a dead server as errors, a NULL reply, or an assertion
            raise self._vanished(e) from e
        if len(raw) != self._pixels * 4:  # the screen shrank under us (xrandr): not the picture we promised
            raise self._vanished(RuntimeError(f"grab returned {len(raw)} bytes, expected {self._pixels * 4}"))
        if self._neq is not None and self._last is not None:
            changed = changed_pixels(raw, self._last, self._neq)
            self.change = changed / self._pixels
            if changed < self._limit:
                self.skipped += 1
                return False
        self._write(raw, dst)
        self._last = raw if self._neq is not None else None
        self.emitted += 1
        if not self.started:
            self.started = True
            self._fire(SHARE_STARTED)
        return True

    def _write(self, raw: bytearray, dst: np.ndarray) -> None:
        x, y, w, h = self.rect
        ow, oh = self.size
        src = np.frombuffer(raw, np.uint8).reshape(h, w, 4)
        if self._resize:
            self._cv2.resize(src, (ow, oh), dst=self._small, interpolation=self._cv2.INTER_AREA)
            src = self._small
        else:
            src = src[:oh, :ow]  # odd source: drop the last column/row
        out = self._cv2.cvtColor(src, self._code, dst=dst)
        if out is not dst:  # OpenCV could not write into dst as given (odd strides): one copy instead
            np.copyto(dst, out)

    def _vanished(self, cause: BaseException) -> ScreenGone:
        """Note that the display is gone, fire STOPPED, drop the connection; the error to raise."""
        detail = str(cause) or "no reply from the X server"
        self.gone = (f"X display {self.display} went away while grabbing {self.monitor.describe()}: the X server "
                     f"stopped answering or refused the grab ({type(cause).__name__}: {detail}); open a new "
                     f"ScreenSource once the display is back")
        log.error("%s", self.gone)
        self._last = None
        self._stop(reason=self.gone)
        try:
            self._sct.close()
        except Exception:  # the connection is already broken; nothing more to release
            pass
        return ScreenGone(self.gone)

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the display; fires ON_SCREEN_SHARE_STOPPED if the share had started."""
        if self.closed:
            return
        self.closed = True
        self._last = None
        self._stop(reason="closed")
        if self.gone is None:
            try:
                self._sct.close()
            except Exception as e:
                log.warning("closing X display %s: %s", self.display, e)

    def __enter__(self) -> ScreenSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<ScreenSource {self.display} {self.monitor.describe()} rect={self.rect} size={self.size} "
                f"{self.fmt} emitted={self.emitted} skipped={self.skipped}>")


# -- benchmark ---------------------------------------------------------------------------

def _sampled_loop(cur: bytearray, last: bytearray, width: int, height: int, step: int = 8) -> float:
    """The naive way: pure Python over every `step`-th pixel of every `step`-th row."""
    changed = total = 0
    for y in range(0, height, step):
        row = y * width * 4
        for x in range(0, width * 4, step * 4):
            i = row + x
            total += 1
            if cur[i: i + 4] != last[i: i + 4]:
                changed += 1
    return changed / total


def bench(width: int = 1920, height: int = 1080, repeat: int = 30) -> list[tuple[str, float, float]]:
    """Diff time per frame (ms) on synthetic BGRA frames: identical, and 1% of pixels changed."""
    rng = np.random.default_rng(1)
    base = bytearray(rng.integers(0, 256, width * height * 4, np.uint8).tobytes())
    same = bytearray(base)
    moved = bytearray(base)
    view = np.frombuffer(moved, np.uint8).reshape(height, width, 4)
    view[height // 2: height // 2 + int(height * 0.01) + 1, :, 0] ^= 0xFF   # ~1% of the pixels, low on screen
    scratch = np.empty(width * height, np.bool_)

    def ours(a, b):
        return changed_pixels(a, b, scratch)

    def u32_only(a, b):
        np.not_equal(np.frombuffer(a, np.uint32), np.frombuffer(b, np.uint32), out=scratch)
        return np.count_nonzero(scratch)

    def int16_mean(a, b):
        x = np.frombuffer(a, np.uint8).reshape(height, width, 4)
        y = np.frombuffer(b, np.uint8).reshape(height, width, 4)
        return np.abs(x.astype(np.int16) - y).mean()

    def sampled(a, b):
        return _sampled_loop(a, b, width, height)

    def timed(fn, a, b, n):
        fn(a, b)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(a, b)
        return (time.perf_counter() - t0) / n * 1e3

    rows = []
    for name, fn, n in (("screen.changed_pixels (memcmp, then uint32 != count)", ours, repeat),
                        ("uint32 != + count_nonzero only", u32_only, repeat),
                        ("np.abs(a.astype(int16) - b).mean()", int16_mean, max(3, repeat // 6)),
                        ("pure-Python loop, 1 pixel in 8x8 sampled", sampled, max(3, repeat // 6))):
        rows.append((name, timed(fn, base, same, n), timed(fn, base, moved, n)))
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m services.capture.sources.screen", description=__doc__.split("\n")[0])
    ap.add_argument("--bench", action="store_true", help="time the frame diff at 1920x1080 against the naive ways")
    ap.add_argument("--size", default="1920x1080", help="frame size for --bench (WxH)")
    args = ap.parse_args(argv)
    if not args.bench:
        ap.print_help()
        return 0
    w, h = (int(v) for v in args.size.lower().split("x"))
    rows = bench(w, h)
    print(f"frame diff, {w}x{h} BGRA ({w * h * 4 / 1e6:.1f} MB per frame), ms per frame")
    print(f"{'method':<56}{'identical':>11}{'1% changed':>12}")
    for name, same_ms, moved_ms in rows:
        print(f"{name:<56}{same_ms:>11.3f}{moved_ms:>12.3f}")
    return 0




def parse_region(text: str) -> tuple[int, int, int, int]:
    """"LEFT,TOP,WIDTH,HEIGHT" -> four ints; width and height at least 2."""
    parts = text.split(",") if isinstance(text, str) else []
    try:
        left, top, width, height = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"expected LEFT,TOP,WIDTH,HEIGHT in pixels, like '0,0,1280,720'; got {text!r}") from None
    if left < 0 or top < 0 or width < 2 or height < 2:
        raise ValueError(f"left and top must be >= 0, width and height >= 2; got {text!r}")
    return left, top, width, height


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be more than 0, got {value!r}")


def _check_actions(text: str) -> None:
    from services.screen.commands import parse_actions  # the input's own module says what it takes
    parse_actions(text)


@dataclass(frozen=True)
class ScreenConfig(SourceConfig):
    kind: str = setting("screen", "screen: an X display, or part of it.", RESTART)
    monitor: int = setting(1, "Monitor number, 0 is all monitors together.", RESTART, min=0, max=64)
    region: str = setting("", "'LEFT,TOP,WIDTH,HEIGHT' inside the monitor; '' is the whole monitor.", RESTART,
                          off="", check=parse_region)
    scale: float = setting(1.0, "Downscale factor in (0, 1], exact (area averaging).", RESTART, max=1.0,
                           check=_check_positive)
    diff_threshold: float = setting(0.0, "Skip a frame when less than this fraction of its pixels differs from "
                                    "the last one sent; 0 sends every frame.", RESTART, min=0.0, max=1.0)
    fps: float = setting(30.0, "Frames per second grabbed.", RESTART, min=0.1, max=240)
    input: bool = setting(False, "Let agents and `edgeroom ctl screen` click, type, press keys and scroll on "
                          "this display (XTest); off by default.", RESTART)
    input_actions: str = setting("", "The input actions allowed when input is on: click, type, keys, scroll; "
                                 "'' allows them all.", RESTART, check=_check_actions)

    session_kind = "screen"

    def target(self) -> str:
        return f"monitor {self.monitor}"

    def frame_interval(self) -> float:
        return 1.0 / self.fps


@source_kind(ScreenConfig, "an X display (or a region of it) grabbed with mss, straight into the slot")
class ScreenCapture:
    """The screen as a capture source: grabs at `fps` into loaned slots, rgb24; frames skipped
    as unchanged are counted, not sent; share started/stopped go out as hook events."""

    def __init__(self, cfg: ScreenConfig) -> None:
        self.cfg = cfg
        self.region = parse_region(cfg.region) if cfg.region else None
        self.info = ""

    def run(self, sink, stop: threading.Event, emit: Emit) -> bool:
        cfg = self.cfg
        try:
            src = ScreenSource(cfg.monitor, self.region, cfg.scale, cfg.diff_threshold)
        except (ScreenGone, ValueError) as exc:
            raise SourceError("display", str(exc)) from None
        src.on_state(lambda event, info: emit(f"hook.{event}", {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in info.items()}))
        w, h = src.size
        self.info = f"{src.monitor.describe()} -> {w}x{h}"
        period = int(1e9 / cfg.fps)
        due = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        try:
            while not stop.is_set():
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                if now < due:
                    stop.wait((due - now) / 1e9)
                    continue
                if now - due > period:
                    sink.m.dropped.labels("late").inc((now - due) // period)
                    due += (now - due) // period * period
                loan = sink.loan_picture(w, h, "rgb24")
                try:
                    sent = src.grab_into(loan.array)
                except ScreenGone as exc:
                    loan.abort()
                    raise SourceError("display", str(exc)) from None
                if sent:
                    sink.send_picture(loan, pts=now, time_base=Fraction(1, 1_000_000_000), capture_ns=now)
                else:
                    loan.abort()
                    sink.m.dropped.labels("unchanged").inc()
                due += period
        finally:
            src.close()
        return False

    def force_keyframe(self) -> str | None:
        return None  # raw pictures: each stands alone

    def describe(self) -> str:
        return self.info


if __name__ == "__main__":
    raise SystemExit(main())
