"""Key names and chords, and the keysym of any character.

    parse_chords("ctrl+shift+t escape") -> [Chord(("Control_L", "Shift_L"), "t"), Chord((), "Escape")]
    keysym_of("é")                      -> 0xe9 (Latin-1 keysyms are the code point)
    keysym_of("ж")                      -> 0x1000436 (any other character: 0x01000000 + code point)

A name that is not known is refused with the known ones listed (RoomKit ignores it silently and
presses nothing). A single character is a key too ("a", "7", "/").
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Chord", "KeyNameError", "MODIFIERS", "NAMED", "keysym_of", "known_names", "parse_chords"]

MODIFIERS = {"ctrl": "Control_L", "control": "Control_L", "shift": "Shift_L", "alt": "Alt_L",
             "super": "Super_L", "win": "Super_L", "meta": "Super_L", "cmd": "Super_L",
             "altgr": "ISO_Level3_Shift"}

NAMED = {"enter": "Return", "return": "Return", "tab": "Tab", "esc": "Escape", "escape": "Escape",
         "space": "space", "backspace": "BackSpace", "delete": "Delete", "del": "Delete", "insert": "Insert",
         "home": "Home", "end": "End", "pageup": "Prior", "pgup": "Prior", "pagedown": "Next", "pgdn": "Next",
         "up": "Up", "down": "Down", "left": "Left", "right": "Right", "capslock": "Caps_Lock",
         "numlock": "Num_Lock", "scrolllock": "Scroll_Lock", "print": "Print", "printscreen": "Print",
         "pause": "Pause", "menu": "Menu", "plus": "plus", "minus": "minus", "comma": "comma",
         "period": "period", "slash": "slash", "backslash": "backslash", "semicolon": "semicolon",
         "apostrophe": "apostrophe", "grave": "grave", "equal": "equal", "bracketleft": "bracketleft",
         "bracketright": "bracketright", **{f"f{n}": f"F{n}" for n in range(1, 25)}}

MAX_CHORDS = 16


class KeyNameError(ValueError):
    """A key name nobody knows; the message lists the known ones."""


@dataclass(frozen=True)
class Chord:
    modifiers: tuple[str, ...]   # keysym names, held in this order
    key: str                     # a keysym name, or "" for a chord of modifiers only
    char: str = ""               # the character, when the key was given as one

    def __str__(self) -> str:
        return "+".join([*self.modifiers, self.key or self.char])


def known_names() -> str:
    return (f"modifiers {', '.join(sorted(set(MODIFIERS)))}; keys {', '.join(sorted(NAMED))}; "
            "or any single character (a, 7, /, é)")


def keysym_of(char: str) -> int:
    """The X keysym of one character (X11 keysymdef: Latin-1 is the code point, the rest 0x01000000 + it)."""
    cp = ord(char)
    if char == "\n":
        return 0xFF0D   # Return
    if char == "\t":
        return 0xFF09   # Tab
    if 0x20 <= cp <= 0x7E or 0xA0 <= cp <= 0xFF:
        return cp
    if cp < 0x20 or 0x7F <= cp < 0xA0:
        raise ValueError(f"cannot type the control character U+{cp:04X}")
    return 0x01000000 + cp


def _one(part: str, text: str) -> tuple[str, str]:
    """(keysym name, character) of one part of a chord."""
    low = part.lower()
    if low in MODIFIERS:
        return MODIFIERS[low], ""
    if low in NAMED:
        return NAMED[low], ""
    if len(part) == 1:
        keysym_of(part)  # refuses control characters
        return "", part
    raise KeyNameError(f"unknown key {part!r} in {text!r}; known: {known_names()}")


def parse_chords(text: str) -> list[Chord]:
    """Chords separated by spaces, keys of a chord by '+': 'ctrl+c', 'alt+tab', 'ctrl+shift+t escape'."""
    if not isinstance(text, str) or not text.strip():
        raise KeyNameError(f"no keys given; known: {known_names()}")
    chords = []
    for word in text.split():
        parts = word.split("+")
        if any(p == "" for p in parts):
            raise KeyNameError(f"empty key in {word!r} (write plus for the + key)")
        named = [_one(p, word) for p in parts]
        mods = tuple(name for (name, _), p in zip(named[:-1], parts[:-1]))
        for (_, char), p in zip(named[:-1], parts[:-1]):
            if char or p.lower() not in MODIFIERS:
                raise KeyNameError(f"{p!r} in {word!r} is not a modifier; only the last key of a chord may be "
                                   f"another key (modifiers: {', '.join(sorted(set(MODIFIERS)))})")
        name, char = named[-1]
        chords.append(Chord(mods, name, char))
    if len(chords) > MAX_CHORDS:
        raise KeyNameError(f"at most {MAX_CHORDS} chords at once, got {len(chords)}")
    return chords
