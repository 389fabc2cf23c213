"""The screen source against a real X server: Xvfb on a free display, drawn on through libX11.

What is on the screen is put there by the test itself (XFillRectangle on the root window,
through ctypes — the same libX11 mss needs), so every check compares against known pixels.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import framebus
from services.capture.sources import screen
from services.capture.sources.screen import (
    SHARE_STARTED,
    SHARE_STOPPED,
    ScreenGone,
    ScreenSource,
    out_size,
)

W, H = 1280, 720
RED, GREEN, BLUE, WHITE, BLACK = 0xFF0000, 0x00FF00, 0x0000FF, 0xFFFFFF, 0x000000

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="Xvfb is not installed")


class Xvfb:
    """An Xvfb on the first free display in :90..:199 (another test run may race us for one).

    Ready means: the display's lock file names our process (Xvfb takes the lock before it
    touches any socket, so a loser of a race exits without harming the winner) and its
    socket accepts a connection (a leftover socket file of a dead server refuses). Not
    -displayfd: with it Xvfb takes no lock, and a loser unlinks the winner's socket.
    -noreset: otherwise Xvfb resets when its last client leaves, refusing connections meanwhile.
    """

    def __init__(self) -> None:
        for n in range(90, 200):
            if _lock_pid(n) is not None and _alive(_lock_pid(n)):
                continue
            proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", f"{W}x{H}x24", "-nolisten", "tcp",
                                     "-noreset"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if _lock_pid(n) == proc.pid and _accepts(f"/tmp/.X11-unix/X{n}"):
                    self.proc, self.n, self.display = proc, n, f":{n}"
                    return
                time.sleep(0.02)
            proc.kill()   # display taken (Xvfb exited), or no answer in time
            proc.wait()
        raise RuntimeError("no free X display in :90..:199")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()   # Xvfb removes its socket and lock itself
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crashing X server goes; then its socket and lock, which it could not remove."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if _lock_pid(self.n) == self.proc.pid:   # not yet taken over by someone else's server
            for leftover in (f"/tmp/.X11-unix/X{self.n}", f"/tmp/.X{self.n}-lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)


def _lock_pid(n: int) -> int | None:
    try:
        return int(Path(f"/tmp/.X{n}-lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class Painter:
    """Fills rectangles of the root window with 0xRRGGBB colours (a TrueColor 24-bit screen)."""

    def __init__(self, display: str) -> None:
        x = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
        x.XOpenDisplay.restype, x.XOpenDisplay.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        x.XDefaultRootWindow.restype, x.XDefaultRootWindow.argtypes = ctypes.c_ulong, [ctypes.c_void_p]
        x.XDefaultGC.restype, x.XDefaultGC.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]
        x.XSetForeground.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong]
        x.XFillRectangle.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.x = x
        self.dpy = x.XOpenDisplay(display.encode())
        assert self.dpy, f"cannot open {display}"
        self.root = x.XDefaultRootWindow(self.dpy)
        self.gc = x.XDefaultGC(self.dpy, 0)

    def fill(self, colour: int, rect: tuple[int, int, int, int] = (0, 0, W, H), sync: bool = True) -> None:
        self.x.XSetForeground(self.dpy, self.gc, colour)
        self.x.XFillRectangle(self.dpy, self.root, self.gc, *rect)
        if sync:
            self.sync()

    def sync(self) -> None:
        self.x.XSync(self.dpy, 0)  # drawn before anyone grabs

    def close(self) -> None:
        self.x.XCloseDisplay(self.dpy)


@pytest.fixture(scope="module")
def xserver():
    x = Xvfb()
    yield x
    x.stop()


@pytest.fixture
def paint(xserver):
    p = Painter(xserver.display)
    p.fill(RED)
    yield p
    p.close()


def rgb(colour: int) -> list[int]:
    return [colour >> 16, (colour >> 8) & 0xFF, colour & 0xFF]


def frame(src: ScreenSource) -> np.ndarray:
    w, h = src.size
    return np.zeros((h, w, 3), np.uint8)


def solid(a: np.ndarray, colour: int) -> bool:
    return bool((a == np.array(rgb(colour), np.uint8)).all())


def test_monitors(xserver):
    with ScreenSource(display=xserver.display) as src:
        mons = src.monitors()
    assert mons[0].index == 0 and (mons[0].width, mons[0].height) == (W, H)
    assert [(m.index, m.left, m.top, m.width, m.height) for m in mons[1:]] == [(1, 0, 0, W, H)]
    assert mons[0].describe() == f"all monitors ({W}x{H} at 0,0)"


def test_full_screen_grab_size_colour_and_place(xserver, paint):
    paint.fill(GREEN, (100, 50, 200, 100))
    for monitor in (0, 1):
        with ScreenSource(monitor, display=xserver.display) as src:
            assert src.size == (W, H)
            a = frame(src)
            assert src.grab_into(a)
            assert solid(a[50:150, 100:300], GREEN)
            assert solid(a[:50], RED) and solid(a[150:], RED) and solid(a[:, :100], RED) and solid(a[:, 300:], RED)
    with ScreenSource(display=xserver.display, fmt="bgr24") as src:
        a = frame(src)
        src.grab_into(a)
        assert a[0, 0].tolist() == [0, 0, 255] and a[60, 110].tolist() == [0, 255, 0]


def test_region_crop(xserver, paint):
    paint.fill(GREEN, (100, 50, 200, 100))
    with ScreenSource(region=(100, 50, 200, 100), display=xserver.display) as src:
        assert src.size == (200, 100) and src.rect == (100, 50, 200, 100)
        a = frame(src)
        assert src.grab_into(a) and solid(a, GREEN)
    with ScreenSource(1, region=(90, 40, 31, 21), display=xserver.display) as src:   # odd: cropped to even
        assert src.size == (30, 20)
        a = frame(src)
        src.grab_into(a)
        assert solid(a[:10], RED) and solid(a[:, :10], RED) and solid(a[10:, 10:], GREEN)


def test_scale_is_exact_area_averaging(xserver, paint):
    paint.fill(BLUE, (W // 2, 0, W // 2, H))
    with ScreenSource(scale=0.5, display=xserver.display) as src:
        assert src.size == (640, 360)
        a = frame(src)
        assert src.grab_into(a)
        assert solid(a[:, :320], RED) and solid(a[:, 320:], BLUE)
    with ScreenSource(scale=0.37, display=xserver.display) as src:
        assert src.size == (474, 266) == out_size(W, H, 0.37)   # 473.6 x 266.4, to the nearest even
        a = frame(src)
        assert src.grab_into(a)
        assert solid(a[:, :236], RED) and solid(a[:, 238:], BLUE)   # 640 * 474 / 1280 = 237: the seam
    # one-pixel black/white stripes: an area average is grey everywhere, an integer stride
    # (every other column) would be all black or all white
    paint.fill(BLACK)
    for x in range(0, W, 2):
        paint.fill(WHITE, (x, 0, 1, H), sync=False)
    paint.sync()
    for scale, lo, hi in ((0.5, 127, 128), (0.37, 80, 175)):   # 0.37: 2.7 columns per pixel, 1 or 2 of them white
        with ScreenSource(scale=scale, display=xserver.display) as src:
            a = frame(src)
            src.grab_into(a)
            assert abs(float(a.mean()) - 127.5) < 3 and lo <= int(a.min()) and int(a.max()) <= hi, scale


def test_unchanged_frames_are_skipped_changed_ones_emitted(xserver, paint):
    with ScreenSource(threshold=1e-9, display=xserver.display) as src:   # any change at all
        a = frame(src)
        assert src.grab_into(a) and solid(a, RED)
        a[:] = 7
        assert not src.grab_into(a)
        assert (a == 7).all(), "a skipped frame must leave the slot alone"
        assert src.change == 0.0
        paint.fill(GREEN, (10, 10, 1, 1))   # one pixel
        assert src.grab_into(a) and a[10, 10].tolist() == rgb(GREEN)
        assert src.change == 1 / (W * H)
        assert not src.grab_into(a)
        paint.fill(BLUE)
        assert src.grab_into(a) and solid(a, BLUE)
        assert (src.emitted, src.skipped) == (3, 2)


def test_threshold_is_a_fraction_of_pixels_changed_since_the_last_emitted_frame(xserver, paint):
    with ScreenSource(threshold=0.01, display=xserver.display) as src:   # 1% of 921600 = 9216 pixels
        a = frame(src)
        assert src.grab_into(a)
        paint.fill(GREEN, (0, 0, 60, 60))                  # 3600 px: 0.39%
        assert not src.grab_into(a) and src.change == 3600 / (W * H)
        paint.fill(GREEN, (600, 300, 60, 60))              # 7200 px since the last EMITTED frame: still under
        assert not src.grab_into(a) and src.change == 7200 / (W * H)
        paint.fill(GREEN, (1000, 600, 60, 60))             # 10800 px: 1.17%
        assert src.grab_into(a) and src.change == 10800 / (W * H)
        assert solid(a[:60, :60], GREEN) and solid(a[300:360, 600:660], GREEN) and solid(a[600:660, 1000:1060], GREEN)
        paint.fill(RED, (0, 0, 60, 60))                    # now measured against that frame
        assert not src.grab_into(a) and src.change == 3600 / (W * H)
        assert (src.emitted, src.skipped) == (2, 3)
    with ScreenSource(threshold=0.0, display=xserver.display) as src:    # 0: never skip, nothing compared
        a = frame(src)
        assert src.grab_into(a) and src.grab_into(a) and src.change is None
        assert (src.emitted, src.skipped) == (2, 0)


def test_share_started_and_stopped_fire_once_each(xserver, paint):
    events = []
    src = ScreenSource(region=(0, 0, 64, 32), threshold=1e-9, display=xserver.display)
    src.on_state(lambda event, info: events.append((event, info)))
    a = frame(src)
    assert events == []
    for _ in range(3):
        src.grab_into(a)
    src.close()
    src.close()
    assert [e for e, _ in events] == [SHARE_STARTED, SHARE_STOPPED]
    started, stopped = events[0][1], events[1][1]
    assert started["display"] == xserver.display and started["rect"] == (0, 0, 64, 32) and started["size"] == (64, 32)
    assert stopped["reason"] == "closed" and (stopped["emitted"], stopped["skipped"]) == (1, 2)
    with pytest.raises(RuntimeError, match="closed"):
        src.grab_into(a)

    events.clear()   # never emitted anything: nothing started, so nothing stops
    with ScreenSource(display=xserver.display) as idle:
        idle.on_state(lambda event, info: events.append(event))
    assert events == []


@pytest.mark.parametrize("kwargs", [{"monitor": 2}, {"monitor": -1}, {"region": (1200, 0, 100, 100)},
                                    {"region": (-1, 0, 10, 10)}, {"region": (0, 0, W + 1, H)},
                                    {"region": (0, 700, 100, 21)}, {"region": (0, 0, 1, 1)}])
def test_bad_monitor_or_region_names_the_geometry(xserver, kwargs):
    with pytest.raises(ValueError, match=f"{W}x{H} at 0,0"):
        ScreenSource(display=xserver.display, **kwargs)


@pytest.mark.parametrize("kwargs, what", [({"scale": 0}, "scale"), ({"scale": 1.5}, "scale"),
                                          ({"threshold": 2}, "threshold"), ({"fmt": "yuv420p"}, "fmt"),
                                          ({"region": (0, 0, 10)}, "region")])
def test_bad_arguments(xserver, kwargs, what):
    with pytest.raises(ValueError, match=what):
        ScreenSource(display=xserver.display, **kwargs)


def test_wrong_destination_is_refused(xserver, paint):
    with ScreenSource(scale=0.5, display=xserver.display) as src:
        with pytest.raises(ValueError, match=r"\(360, 640, 3\)"):
            src.grab_into(np.zeros((H, W, 3), np.uint8))


def test_grabs_straight_into_a_bus_slot(xserver, paint, prefix, monkeypatch):
    paint.fill(GREEN, (0, 0, W // 2, H))
    with ScreenSource(scale=0.25, display=xserver.display) as src:
        w, h = src.size
        with framebus.Producer.create("screen", "video", payload=w * h * 3, slots=4, prefix=prefix) as p, \
                framebus.Consumer.attach("screen", prefix=prefix) as c:
            loan = p.loan_picture(w, h, "rgb24")
            with monkeypatch.context() as m:   # OpenCV writes into the slot itself: no fallback copy
                m.setattr(screen.np, "copyto", lambda *a, **k: pytest.fail("copied instead of writing in place"))
                assert src.grab_into(loan.array)
            loan.send(pts=1)
            item = c.receive(timeout=5)
            assert (item.width, item.height) == (320, 180)
            assert solid(item.array[:, :160], GREEN) and solid(item.array[:, 160:], RED)


def test_display_that_goes_away_is_a_clear_error_not_a_crash():
    x = Xvfb()
    try:
        events = []
        src = ScreenSource(display=x.display, threshold=1e-9)
        src.on_state(lambda event, info: events.append((event, info)))
        a = frame(src)
        assert src.grab_into(a)
        x.kill()
        for _ in range(3):   # the first finds out; later ones fail at once, without touching X
            with pytest.raises(ScreenGone, match=f"X display {x.display} went away"):
                src.grab_into(a)
        assert src.gone and [e for e, _ in events] == [SHARE_STARTED, SHARE_STOPPED]
        assert "went away" in events[1][1]["reason"]
        src.close()
        assert len(events) == 2
    finally:
        x.kill()
    with pytest.raises(ScreenGone, match=f"cannot open X display {x.display}"):
        ScreenSource(display=x.display)


def test_out_size_is_even_and_never_larger_than_the_source():
    assert out_size(1920, 1080, 1.0) == (1920, 1080)
    assert out_size(1921, 1081, 1.0) == (1920, 1080)
    assert out_size(1920, 1080, 0.37) == (710, 400)
    assert out_size(101, 51, 0.999) == (100, 50)
    assert out_size(10, 10, 0.01) == (2, 2)


def test_bench_runs(capsys):
    assert screen.main(["--bench", "--size", "64x36"]) == 0
    out = capsys.readouterr().out
    assert "changed_pixels" in out and "int16" in out and "pure-Python" in out
