"""XInput: the pointer and keyboard of one X display, through the XTest extension (python-xlib).

    x = XInput(":0")                       # None: $DISPLAY
    x.monitors()                           # [Monitor(0, ...), Monitor(1, ...), ...] (monitors.py)
    x.click(1500, 300, button=1, count=2)  # root coordinates
    x.type_text("naïve ЖЖ 😀\n")           # any character: no clipboard, no xclip
    x.press(parse_chords("ctrl+a backspace"))
    x.scroll(dy=3, at=(1500, 300))         # wheel clicks: dy > 0 down, dx > 0 right
    x.close()                              # gives back the keycodes it borrowed

Not thread-safe: one thread owns an XInput (the capture service's input worker).

Typing any character: a character the keyboard map has (plainly or with Shift) is typed with
its keycode. Any other is given a *spare* keycode, one the map leaves empty, with
XChangeKeyboardMapping (both levels set to its keysym, so Shift does not matter), then pressed
and released with XTest. A client turns a keycode into a keysym when it reads the event,
with the map it fetched after the server's MappingNotify; if that keycode were mapped to the
next character before the client read the first, it would see the wrong one. So borrowed
keycodes are never restored between characters: each character keeps its keycode
(least-recently-used first when the spares run out), and a keycode is only given a new
character once REUSE_AFTER seconds have passed since it was last pressed. A client fetches
the map lazily, some time after the MappingNotify: so the characters a text needs are mapped
first, all at once (a chunk of the text at a time when it needs more keycodes than are
spare), then SETTLE seconds pass, then its keys are pressed (Tk under Xvfb misread about one
borrowed character in three without that pause). `close()` gives every borrowed keycode back
(empty).
"""
from __future__ import annotations

import time
from collections import OrderedDict

from services.screen.keys import Chord, keysym_of
from services.screen.monitors import Monitor, read_monitors

__all__ = ["InputUnavailable", "XInput"]

REUSE_AFTER = 0.25   # seconds before a borrowed keycode may carry another character
SETTLE = 0.05        # seconds for clients to fetch a changed keyboard map before its keys are pressed
SCROLL_BUTTONS = {"up": 4, "down": 5, "left": 6, "right": 7}
BUTTONS = {"left": 1, "middle": 2, "right": 3}


class InputUnavailable(RuntimeError):
    """The display cannot be opened, or has no XTest."""


class XInput:
    def __init__(self, display: str | None = None) -> None:
        from Xlib import XK, X, error
        from Xlib import display as xdisplay
        from Xlib.ext import xtest
        self._X, self._XK, self._xtest = X, XK, xtest
        try:
            self.d = xdisplay.Display(display)
        except (error.DisplayError, error.ConnectionClosedError, OSError) as exc:
            raise InputUnavailable(f"cannot open X display {display or '$DISPLAY'}: {exc}") from None
        self.name = self.d.get_display_name()
        if not self.d.has_extension("XTEST"):
            self.d.close()
            raise InputUnavailable(f"X display {self.name} has no XTest extension")
        self.root = self.d.screen().root
        info = self.d.display.info
        self._min, self._max = info.min_keycode, info.max_keycode
        self._map = self.d.get_keyboard_mapping(self._min, self._max - self._min + 1)
        self._spares = [self._min + i for i, syms in enumerate(self._map) if not any(syms)]
        self._borrowed: OrderedDict[int, int] = OrderedDict()   # keysym -> keycode, least recently used first
        self._used: dict[int, float] = {}                       # keycode -> when last pressed

    # --- the pointer ---------------------------------------------------------------------
    def monitors(self) -> list[Monitor]:
        return read_monitors(self.d)

    def move(self, x: int, y: int) -> None:
        self._xtest.fake_input(self.d, self._X.MotionNotify, x=x, y=y, root=self.root)

    def click(self, x: int, y: int, button: int = 1, count: int = 1) -> None:
        self.move(x, y)
        for _ in range(count):
            self._xtest.fake_input(self.d, self._X.ButtonPress, button)
            self._xtest.fake_input(self.d, self._X.ButtonRelease, button)
        self.d.sync()

    def scroll(self, dy: int = 0, dx: int = 0, at: tuple[int, int] | None = None) -> None:
        if at is not None:
            self.move(*at)
        for amount, less, more in ((dy, "up", "down"), (dx, "left", "right")):
            button = SCROLL_BUTTONS[more if amount > 0 else less]
            for _ in range(abs(amount)):
                self._xtest.fake_input(self.d, self._X.ButtonPress, button)
                self._xtest.fake_input(self.d, self._X.ButtonRelease, button)
        self.d.sync()

    def pointer(self) -> tuple[int, int]:
        p = self.root.query_pointer()
        return p.root_x, p.root_y

    # --- the keyboard --------------------------------------------------------------------
    def _keycode(self, keysym: int) -> tuple[int, bool]:
        """(keycode, with Shift) of a keysym the map has at level 1 or 2; (0, False) if none."""
        for i, syms in enumerate(self._map):
            if syms and syms[0] == keysym:
                return self._min + i, False
        for i, syms in enumerate(self._map):
            if len(syms) > 1 and syms[1] == keysym:
                return self._min + i, True
        return 0, False

    def _borrow(self, keysyms: list[int]) -> dict[int, int]:
        """Spare keycodes carrying `keysyms` (at most as many as there are spares), mapped now where they
        were not; after a change, SETTLE seconds for the clients to fetch the new map before any is pressed."""
        if len(keysyms) > len(self._spares):
            raise InputUnavailable(f"the keyboard map of {self.name} has {len(self._spares)} empty keycode(s) to "
                                   f"type with, {len(keysyms)} needed")
        codes: dict[int, int] = {}
        changed = False
        for keysym in keysyms:
            code = self._borrowed.get(keysym)
            if code is not None:
                self._borrowed.move_to_end(keysym)
                codes[keysym] = code
        for keysym in (k for k in keysyms if k not in codes):
            if len(self._borrowed) < len(self._spares):
                code = self._spares[len(self._borrowed)]
            else:
                _old, code = self._borrowed.popitem(last=False)   # least recently used, not one of `keysyms`
                wait = self._used.get(code, 0.0) + REUSE_AFTER - time.monotonic()
                if wait > 0:   # that keycode's last character may not have been read yet
                    self.d.sync()
                    time.sleep(wait)
            self.d.change_keyboard_mapping(code, [(keysym, keysym)])
            self._borrowed[keysym] = codes[keysym] = code
            changed = True
        if changed:
            self.d.sync()
            time.sleep(SETTLE)
        return codes

    def _tap(self, code: int, shift: bool = False) -> None:
        shift_code = self.d.keysym_to_keycode(self._XK.string_to_keysym("Shift_L")) if shift else 0
        if shift_code:
            self._xtest.fake_input(self.d, self._X.KeyPress, shift_code)
        self._xtest.fake_input(self.d, self._X.KeyPress, code)
        self._xtest.fake_input(self.d, self._X.KeyRelease, code)
        if shift_code:
            self._xtest.fake_input(self.d, self._X.KeyRelease, shift_code)
        self._used[code] = time.monotonic()

    def type_text(self, text: str) -> None:
        plan = []
        for char in text:
            keysym = keysym_of(char)
            code, shift = self._keycode(keysym)
            plan.append((keysym, code, shift))
        chunk: list[tuple[int, int, bool]] = []
        missing: set[int] = set()
        for step in plan:   # chunks that need at most as many borrowed keycodes as there are spares
            if not step[1] and step[0] not in missing and len(missing) == len(self._spares):
                self._type_chunk(chunk, missing)
                chunk, missing = [], set()
            if not step[1]:
                missing.add(step[0])
            chunk.append(step)
        self._type_chunk(chunk, missing)
        self.d.sync()

    def _type_chunk(self, chunk: list[tuple[int, int, bool]], missing: set[int]) -> None:
        codes = self._borrow(sorted(missing)) if missing else {}
        for keysym, code, shift in chunk:
            self._tap(code or codes[keysym], shift)

    def _named(self, name: str) -> int:
        keysym = self._XK.string_to_keysym(name)
        code, _ = self._keycode(keysym) if keysym else (0, False)
        return code or self._borrow([keysym])[keysym]

    def press(self, chords: list[Chord]) -> None:
        X = self._X
        for chord in chords:
            held = [self._named(m) for m in chord.modifiers]
            if chord.char:
                keysym = keysym_of(chord.char)
                code, shift = self._keycode(keysym)
                if not code:
                    code, shift = self._borrow([keysym])[keysym], False
            else:
                code, shift = self._named(chord.key), False
            for c in held:
                self._xtest.fake_input(self.d, X.KeyPress, c)
            self._tap(code, shift and not chord.modifiers)
            for c in reversed(held):
                self._xtest.fake_input(self.d, X.KeyRelease, c)
        self.d.sync()

    # --- the end -------------------------------------------------------------------------
    def close(self) -> None:
        try:
            for code in sorted(self._borrowed.values()):
                self.d.change_keyboard_mapping(code, [(0, 0)])
            self.d.sync()
        except Exception:  # the display may be gone; nothing left to give back then
            pass
        self._borrowed.clear()
        self.d.close()

    def __enter__(self) -> XInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
