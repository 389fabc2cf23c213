"""One `edgeroom run` for a benchmark: a private runtime dir and bus prefix, the config's
lines given by the benchmark, a control client, its log, readiness, and a clean stop; and
the H.264 test clips the benchmarks feed it.

benchmarks/ingest.py (capture + decode), benchmarks/record.py (the recorder) and
benchmarks/vision.py (the load test) start their boxes through this one class.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import framebus
from services.control.client import Client, ControlError

__all__ = ["BenchBox", "encode_testsrc"]

_ROOT = Path(__file__).resolve().parent.parent


class BenchBox:
    def __init__(self, prefix: str, tmp_prefix: str, streams: list[str], client_timeout: float = 2.0) -> None:
        self.streams = streams
        self.dir = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir="/tmp"))
        self.prefix = prefix
        self.rundir = self.dir / "run"
        self.config = self.dir / "edgeroom.toml"
        self.log_path = self.dir / "run.log"
        self.client_timeout = client_timeout
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None

    def write_config(self, lines: list[str]) -> None:
        """The box's runtime dir, prefix, log level and a free metrics port, then `lines`."""
        q = json.dumps  # a TOML basic string is a JSON string
        head = [f"[box]\nruntime_dir = {q(str(self.rundir))}", f"[bus]\nprefix = {q(self.prefix)}",
                '[log]\nlevel = "info"', '[hub]\nmetrics_listen = "127.0.0.1:0"']
        self.config.write_text("\n".join(head + lines) + "\n")

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("EDGEROOM_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["EDGEROOM_CONFIG"] = str(self.config)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "run"], cwd=_ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = Client(f"ipc://{self.rundir}/control.sock", timeout=self.client_timeout)

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def warning_lines(self) -> list[str]:
        """The warning, error and critical lines the box logged (and its children's stderr)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln[:300] for ln in lines if " warning " in ln or " error " in ln or " critical " in ln
                or " stderr: " in ln]

    def status(self) -> dict:
        return self.client.call("status")

    def wait_ready(self, timeout: float, want: list[str],
                   also: Callable[[dict], list[str]] = lambda rows: []) -> dict:
        """The services in `want` ready, and nothing missing by `also(rows)`: the status."""
        deadline = time.monotonic() + timeout
        last = "no answer from the hub"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edgeroom run exited {self.proc.returncode}: {self.log_tail()}")
            try:
                st = self.status()
            except ControlError as exc:
                last = str(exc)
                time.sleep(0.2)
                continue
            rows = {r["service"]: r for r in st["services"]}
            missing = [w for w in want if rows.get(w, {}).get("state") != "ready"] + also(rows)
            if not missing:
                return st
            last = "waiting for " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            time.sleep(0.25)
        raise RuntimeError(f"not ready after {timeout:.0f} s ({last}): {self.log_tail()}")

    def close(self, keep_dir: bool = False) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        framebus.gc(self.prefix)  # the box's processes are gone: everything under its prefix is stale
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def encode_testsrc(path: Path, width: int, height: int, fps: int, seconds: float, kbps: int, gop: int,
                   log: Callable[[str], None] = print) -> Path:
    """An H.264 High clip of FFmpeg's testsrc2 at a constant bit rate, no B-frames, a keyframe
    every `gop` frames: made once and cached at `path` (atomically: a half-written file is never kept)."""
    if path.exists():
        return path
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not installed (apt-get install ffmpeg): it makes the clips and is a baseline")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.mp4")
    cmd = ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}",
           "-c:v", "libx264", "-preset", "fast", "-profile:v", "high", "-pix_fmt", "yuv420p",
           "-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{2 * kbps}k",
           "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0", "-bf", "0",
           "-movflags", "+faststart", "-f", "mp4", str(tmp)]
    log(f"-- making {path} (once; cached)")
    t = time.monotonic()
    try:
        subprocess.run(cmd, check=True, timeout=900)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"   made in {time.monotonic() - t:.1f} s")
    return path
