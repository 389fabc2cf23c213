"""The monitors of an X display, numbered as the screen source numbers them, and points on them.

Monitor 0 is the box around all of them (mss's convention, the screen source's `monitor = 0`),
1.. are RandR 1.5 monitors in the server's order: the same request mss makes, so monitor N
here is monitor N of a `[sources.NAME] monitor = N`. A display without RandR has one monitor,
its root window.

A point is given either on the whole X screen (root coordinates, what XTest moves to), or
relative to one monitor's top-left corner. Either way it must lie on a monitor: a point in
the gap between two monitors of different sizes, or past the screen's edge, is refused
(`OffMonitor`), and nothing is clicked.
"""
from __future__ import annotations

from typing import Any

from services.capture.sources.screen import Monitor

__all__ = ["Monitor", "OffMonitor", "listing", "place", "read_monitors", "rows"]


class OffMonitor(ValueError):
    """A point that lies on no monitor (or not on the monitor it names)."""


def read_monitors(display: Any) -> list[Monitor]:
    """Every monitor of a python-xlib Display, index 0 being all of them together."""
    root = display.screen().root
    found: list[Monitor] = []
    if display.has_extension("RANDR"):
        try:
            for i, m in enumerate(root.xrandr_get_monitors(is_active=True).monitors, 1):
                found.append(Monitor(i, m.x, m.y, m.width_in_pixels, m.height_in_pixels))
        except Exception:  # RandR older than 1.5: the root window alone, as below
            found = []
    if not found:
        geo = root.get_geometry()
        found = [Monitor(1, 0, 0, geo.width, geo.height)]
    left = min(m.left for m in found)
    top = min(m.top for m in found)
    right = max(m.left + m.width for m in found)
    bottom = max(m.top + m.height for m in found)
    return [Monitor(0, left, top, right - left, bottom - top), *found]


def _on(m: Monitor, x: int, y: int) -> bool:
    return m.left <= x < m.left + m.width and m.top <= y < m.top + m.height


def listing(monitors: list[Monitor]) -> str:
    return "; ".join(m.describe() for m in monitors[1:])


def place(monitors: list[Monitor], x: int, y: int, monitor: int | None = None) -> tuple[int, int, int]:
    """(root x, root y, the monitor it is on) for a point on the screen, or relative to `monitor`
    (0: relative to the box of all monitors). Raises OffMonitor naming the monitors."""
    if monitor is not None:
        if not 0 <= monitor < len(monitors):
            raise OffMonitor(f"no monitor {monitor}: there are {listing(monitors)}")
        base = monitors[monitor]
        if not (0 <= x < base.width and 0 <= y < base.height):
            raise OffMonitor(f"({x}, {y}) is not on {base.describe()}: it must lie within 0..{base.width - 1} x "
                             f"0..{base.height - 1}")
        x, y = base.left + x, base.top + y
    on = next((m for m in monitors[1:] if _on(m, x, y)), None)
    if on is None:
        raise OffMonitor(f"({x}, {y}) is off every monitor: there are {listing(monitors)}")
    return x, y, on.index


def rows(monitors: list[Monitor]) -> list[dict[str, int]]:
    """The monitors as JSON rows (index 0 included)."""
    return [{"monitor": m.index, "left": m.left, "top": m.top, "width": m.width, "height": m.height}
            for m in monitors]
