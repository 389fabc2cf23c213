"""A desk for the screen-input tests: Xvfb split into two monitors, a real window on the second,
and a loopback OpenAI-compatible server that finds that window in the screenshots it is sent.

    with Desk() as desk:                     # Xvfb 2000x800: monitor 1 1200x800 at 0,0; monitor 2 800x600 at 1200,0
        win = desk.window(1400, 100, 300, 200)   # tests/xwindow.py, magenta; win.events(), win.wait(pred)
    finder = BoxFinder()                     # finder.base_url; answers {found, box, label} from the pixels

Two monitors on one Xvfb screen: RandR 1.5 monitors set with `xrandr --setmonitor` (Xvfb has
one output; -noreset keeps them: Xvfb resets, and forgets them, when its last client leaves).
The root screen's automatic monitor stays as monitor 3 (it cannot be deleted); it covers the
whole screen, so "off every monitor" is past the screen's edge, or off the monitor named.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np

from tests.test_screen import _accepts, _alive, _lock_pid

W, H = 2000, 800
LEFT = (0, 0, 1200, 800)
RIGHT = (1200, 0, 800, 600)
HERE = Path(__file__).resolve().parent


class Window:
    def __init__(self, display: str, x: int, y: int, w: int, h: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "xwindow.py"), *map(str, (x, y, w, h))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={"DISPLAY": display, "PATH": "/usr/bin:/bin"})
        self.lines: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait(lambda e: e["event"] == "ready", "the window mapped")

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cv:
                self.lines.append(json.loads(line))
                self._cv.notify_all()

    def wait(self, pred, what: str, timeout: float = 10.0) -> dict:
        with self._cv:
            end = time.monotonic() + timeout
            while True:
                hit = next((e for e in self.lines if pred(e)), None)
                if hit is not None:
                    return hit
                if not self._cv.wait(max(0.0, end - time.monotonic())) and time.monotonic() >= end:
                    raise AssertionError(f"the window never reported {what}; it got {self.lines}; "
                                         f"stderr: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")

    def typed(self) -> str:
        with self._cv:
            return "".join(e["char"] for e in self.lines if e["event"] == "key")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Desk:
    def __init__(self) -> None:
        for n in range(200, 320):
            if _lock_pid(n) is not None and _alive(_lock_pid(n)):
                continue
            proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", f"{W}x{H}x24", "-nolisten", "tcp", "-noreset"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if _lock_pid(n) == proc.pid and _accepts(f"/tmp/.X11-unix/X{n}"):
                    self.proc, self.display = proc, f":{n}"
                    self._monitors()
                    self.windows: list[Window] = []
                    return
                time.sleep(0.02)
            proc.kill()
            proc.wait()
        raise RuntimeError("no free X display in :200..:319")

    def _monitors(self) -> None:
        for name, (x, y, w, h) in (("LEFT", LEFT), ("RIGHT", RIGHT)):
            subprocess.run(["xrandr", "--setmonitor", name, f"{w}/{w // 4}x{h}/{h // 4}+{x}+{y}", "none"],
                           env={"DISPLAY": self.display}, check=True, capture_output=True)

    def window(self, x: int, y: int, w: int, h: int) -> Window:
        win = Window(self.display, x, y, w, h)
        self.windows.append(win)
        return win

    def close(self) -> None:
        for win in self.windows:
            win.close()
        self.proc.terminate()
        self.proc.wait(5)

    def __enter__(self) -> Desk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BoxFinder:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (port 0) that answers the screen-element
    schema from the picture itself: the bounding box of its magenta pixels, found=false when there are none.
    Every request's picture size is kept (`sizes`)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []
        finder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = next(p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
                           for p in m["content"] if p.get("type") == "image_url")
                img = cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
                finder.sizes.append((img.shape[1], img.shape[0]))
                b, g, r = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
                ys, xs = np.nonzero((r > 200) & (b > 200) & (g < 80))
                answer = ({"found": True, "box": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
                           "label": "the magenta window"} if len(xs) else
                          {"found": False, "box": [0, 0, 0, 0], "label": "nothing magenta"})
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": json.dumps(answer)}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
