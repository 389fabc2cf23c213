"""A real X window for the screen-input tests: a Tk toplevel at a given place, painted one colour,
that prints on stdout (one JSON object a line) every click and key it receives.

    python tests/xwindow.py X Y WIDTH HEIGHT [COLOUR]     (DISPLAY from the environment)

    {"event": "ready", "x": 1400, "y": 100, "width": 300, "height": 200}
    {"event": "click", "button": 1, "x_root": 1500, "y_root": 180, "x": 100, "y": 80}
    {"event": "key", "char": "Ж", "keysym": "Cyrillic_ZHE", "keysym_num": 1719, "state": 0}
    {"event": "wheel", "button": 5}

There is no window manager: the window is placed where asked (override-redirect) and takes the
keyboard focus when it is mapped and on every click, as a focused application would.
"""
from __future__ import annotations

import json
import sys
import tkinter


def emit(**fields: object) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def main() -> None:
    x, y, w, h = (int(v) for v in sys.argv[1:5])
    colour = sys.argv[5] if len(sys.argv) > 5 else "#ff00ff"
    root = tkinter.Tk()
    root.overrideredirect(True)
    root.geometry(f"{w}x{h}+{x}+{y}")
    root.configure(background=colour)

    def click(e: tkinter.Event) -> None:
        if e.num in (4, 5, 6, 7):
            emit(event="wheel", button=e.num)
            return
        root.focus_force()
        emit(event="click", button=e.num, x_root=e.x_root, y_root=e.y_root, x=e.x, y=e.y)

    def key(e: tkinter.Event) -> None:
        emit(event="key", char=e.char, keysym=e.keysym, keysym_num=e.keysym_num, state=e.state)

    def mapped(_e: tkinter.Event) -> None:
        root.focus_force()
        emit(event="ready", x=root.winfo_rootx(), y=root.winfo_rooty(), width=root.winfo_width(),
             height=root.winfo_height())

    root.bind("<ButtonPress>", click)
    root.bind("<KeyPress>", key)
    root.bind("<Map>", mapped)
    root.mainloop()


if __name__ == "__main__":
    main()
