"""SpeakerPicker: a room's active speaker from its participants' levels, with hysteresis.

    picker = SpeakerPicker(threshold_db=-45.0, margin_db=6.0, hold_s=1.0)
    loop.every(0.1, lambda: show(picker.update(mixer.levels(), time.monotonic())))
    picker.previous     # who spoke before: what the current speaker itself is shown

The rules, on every update (levels in dBFS, as services/bridge/mixer.py's Mixer.levels() gives them):
* **Nobody speaks yet**: the loudest participant above `threshold_db` takes over at once.
* **A change needs a clear, lasting lead.** Another participant takes over only after it has been
  above `threshold_db` and louder than the current speaker by `margin_db`, continuously, for `hold_s`
  (each contender's run timed on its own; the loudest of those whose run is long enough wins). A
  short burst (a cough, a door) or two people talking over each other at a similar level never flaps.
* **Silence keeps the speaker**: while nobody is above the threshold, the current speaker stays.
* **A participant who leaves** (absent from the levels) stops being the speaker at once: the
  loudest one above the threshold takes over, else the previous speaker if still present, else None.
  One who leaves is no longer the previous speaker either.

`previous` is the speaker before the current one (None before the first change). Plain state, no
clock of its own: `now` is whatever monotonic seconds the caller passes.
"""
from __future__ import annotations

__all__ = ["SpeakerPicker"]


class SpeakerPicker:
    def __init__(self, *, threshold_db: float = -45.0, margin_db: float = 6.0, hold_s: float = 1.0) -> None:
        self.threshold_db, self.margin_db, self.hold_s = threshold_db, margin_db, hold_s
        self.current: str | None = None
        self.previous: str | None = None
        self.changed_at: float | None = None    # when the current speaker took over
        self._since: dict[str, float] = {}      # contender -> since when it has led the current speaker enough

    def update(self, levels: dict[str, float], now: float) -> str | None:
        """The current speaker after these levels (None: nobody yet)."""
        if self.previous is not None and self.previous not in levels:
            self.previous = None
        loud = {p: lv for p, lv in levels.items() if lv >= self.threshold_db}
        if self.current is not None and self.current not in levels:        # the speaker left
            self.current = None
            if loud:
                self._switch(max(loud, key=loud.__getitem__), now)
            elif self.previous is not None:
                self.current, self.previous = self.previous, None
                self._since.clear()
                self.changed_at = now
            return self.current
        if self.current is None:
            if loud:
                self._switch(max(loud, key=loud.__getitem__), now)
            return self.current
        bar = levels[self.current] + self.margin_db
        leading = {p: lv for p, lv in loud.items() if p != self.current and lv >= bar}
        for p in [p for p in self._since if p not in leading]:
            del self._since[p]                                              # its run is broken
        for p in leading:
            self._since.setdefault(p, now)
        ready = {p: lv for p, lv in leading.items() if now - self._since[p] >= self.hold_s}
        if ready:
            self._switch(max(ready, key=ready.__getitem__), now)
        return self.current

    def _switch(self, new: str, now: float) -> None:
        old = self.current
        if old is not None and old != new:
            self.previous = old
        elif self.previous == new:         # the speaker left: the one before it is not "previous" of itself
            self.previous = None
        self.current = new
        self.changed_at = now
        self._since.clear()
