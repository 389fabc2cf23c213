"""Real SIP peers driven from pytest: baresip 1.0 user agents and SIPp 3.6 scenarios.

Everything runs on loopback and every port is picked at run time (tests/ports.py: a port of
this test worker's own, checked free; baresip's RTP ports come from the ephemeral range).
Nothing here knows the box's SIP service: tests aim these peers at it.

baresip 1.0 facts this module relies on (read from its source, tag v1.0.0, and seen here):
- control: module `ctrl_tcp`, one TCP client at a time, netstring-framed JSON both ways.
  Command `{"command": "dial", "params": "sip:..", "token": "7"}` is answered by
  `{"response": true, "ok": true, "data": "...", "token": "7"}`; events arrive as
  `{"event": true, "class": "call", "type": "CALL_ESTABLISHED", "id": CALL-ID, ...}`.
- `net_interface 127.0.0.1` keeps SIP and the SDP on loopback (`net_interface lo` fails:
  "could not get IPv4 address"), but RTP sockets are bound to 0.0.0.0 whatever the config.
- `video_codecs=H264` on the account keeps the first H264 codec only: packetization-mode 0
  (avcodec registers mode 0 first, then mode 1). Leave video_codecs unset to offer both
  modes (pt 96 mode 0, pt 97 mode 1, then H263, MP4V-ES, H265, VP8).
- Its digest client (libre 1.1) gives up with ENOSYS when ANY challenge in a 401/407 has
  an algorithm other than MD5 (src/sip/auth.c auth_handler): a 401 that lists SHA-256
  next to MD5 makes baresip 1.0 fail the call.
- The `snapshot` module: `snapshot_recv PATH` saves the next DECODED remote picture as PNG
  (PATH at most 99 characters, relative to baresip's working directory).
- The `sndfile` audio filter writes every decoded (and encoded) sample to
  `dump-<time>-dec.wav` (`-enc.wav`) at the codec's rate (PCMU: 8 kHz mono).
- `ausine` only runs at 48 kHz stereo: `ausrc_srate 48000` and `ausrc_channels 2` are set.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.ports import EPHEMERAL, free_block, free_port, free_udp_block

HERE = Path(__file__).parent
SIPP_SCENARIOS = HERE / "sipp"
BARESIP = shutil.which("baresip")
SIPP = shutil.which("sipp")
BARESIP_MODULES = Path(os.environ.get("BARESIP_MODULES", "/usr/lib/baresip/modules"))

_missing_baresip = (
    "baresip is not installed (Debian baresip-core, baresip-ffmpeg)" if not BARESIP
    else f"baresip modules not found in {BARESIP_MODULES}" if not (BARESIP_MODULES / "ctrl_tcp.so").exists()
    else None
)
requires_baresip = pytest.mark.skipif(_missing_baresip is not None, reason=_missing_baresip or "")
requires_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (Debian sip-tester)")

LOOPBACK = "127.0.0.1"


# ports: free_port and free_udp_block (tests/ports.py) give ports of this test worker's own, outside
# the kernel's ephemeral range, so a port picked here is not handed to anything else before its peer binds it


def free_sip_port() -> int:
    """A port for baresip's SIP (UDP and TCP): baresip also listens for SIP over TLS on the port after
    it (tls: accept error, when a control client connects there instead), so both are free and taken."""
    return free_block(2, udp=True, tcp=True)


# ---------------------------------------------------------------------------------------
# process output


class _Tail:
    """The last `limit` bytes a child wrote (baresip's status line uses \\r, not \\n)."""

    def __init__(self, stream: Any, limit: int = 512 * 1024) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._limit = limit
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            with self._lock:
                self._chunks.append(chunk)
                self._size += len(chunk)
                while self._size > self._limit and len(self._chunks) > 1:
                    self._size -= len(self._chunks.popleft())
        stream.close()

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)
        return data.decode("utf-8", "replace")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


_STATUS_LINE = re.compile(r"\[\d+:\d\d:\d\d\] audio=[^\r\n]*?efps=\S+\s*")


# ---------------------------------------------------------------------------------------
# baresip


class BaresipError(RuntimeError):
    pass


_AUDIO_MODULES = {"PCMU": "g711", "PCMA": "g711", "OPUS": "opus", "G722": "g722", "L16": "l16"}
_VIDEO_MODULES = {"H264": "avcodec", "H263": "avcodec", "MP4V-ES": "avcodec", "H265": "avcodec",
                  "VP8": "vp8", "VP9": "vp9"}


@dataclass
class VideoStats:
    """What `video_debug` says about the current call's video stream."""

    tx_codec: str | None
    rx_codec: str | None
    tx_frames: int  # frames taken from the video source (fakevideo)
    rx_frames: int  # frames decoded and handed to the display: decoded pictures
    rx_size: tuple[int, int]
    rx_keyframes: int  # keyframes the decoder got
    picture_updates: int  # keyframe requests (PLI/FIR) this receiver asked for
    pt_enc: int | None  # payload type baresip sends with: tells which H264 mode was chosen
    raw: str


def parse_video_debug(text: str) -> VideoStats:
    def grab(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, text)

    tx = grab(r"tx: encode: (\S+)")
    rx = grab(r"rx: decode: (\S+)")
    src = grab(r"source: .*? frames=(\d+)")
    disp = grab(r"vidisp: \S+ (\d+) x (\d+) frames=(\d+)")
    kf = grab(r"n_keyframes=(\d+), n_picup=(\d+)")
    pt = grab(r"pt_enc=(\d+)")
    return VideoStats(
        tx_codec=None if not tx or tx.group(1) == "none" else tx.group(1),
        rx_codec=None if not rx or rx.group(1) == "none" else rx.group(1),
        tx_frames=int(src.group(1)) if src else 0,
        rx_frames=int(disp.group(3)) if disp else 0,
        rx_size=(int(disp.group(1)), int(disp.group(2))) if disp else (0, 0),
        rx_keyframes=int(kf.group(1)) if kf else 0,
        picture_updates=int(kf.group(2)) if kf else 0,
        pt_enc=int(pt.group(1)) if pt else None,
        raw=text,
    )


_CALL_STATES = {"CALL_INCOMING", "CALL_RINGING", "CALL_PROGRESS", "CALL_ESTABLISHED", "CALL_CLOSED"}


class Baresip:
    """One headless baresip 1.0 user agent in its own directory, driven over ctrl_tcp.

    It listens for SIP on 127.0.0.1:`sip_port` (UDP and TCP; and TLS on the port after it: see free_sip_port)
    and is called at `self.uri`.
    With `user`/`password` it answers 401/407 challenges (MD5 only) when it dials.
    Media: the `ausine` tone (48 kHz stereo) and the `fakevideo` picture (three vertical bars,
    red | green | blue) are sent; received audio is dumped to WAV (sndfile), received video is
    decoded and handed to fakevideo's null display; `snapshot_recv` saves a decoded picture.

    video_codecs: baresip names ("H264", "VP8", "H263", "MP4V-ES", "H265", "VP9"). ("H264",)
    offers packetization-mode 0 ONLY (and then refuses a mode-1-only offer with port 0); None
    offers all it has: H264 mode 0 (pt 96), H264 mode 1 (pt 97), H263, MP4V-ES, H265, VP8.
    audio_codecs: ("PCMU",), ("opus",), ...; None offers PCMU, PCMA, opus (+ telephone-event).
    Its offer always carries `a=rtcp-fb:* nack pli` (no ccm fir) and no sprop-parameter-sets.
    Observations and what they prove:
      call_established() / wait_event("CALL_ESTABLISHED"): SIP offer/answer completed (no media);
      wait_event("CALL_RTPESTAB", param="video"): a first RTP packet arrived on that stream;
      video_stats().rx_frames / wait_video_frames(): pictures DECODED and handed to the display;
      remote_picture(): one decoded picture as RGB (fakevideo: see looks_like_fakevideo());
      received_audio(): every decoded audio sample (sndfile sits after the decoder), at the
        codec's rate; dominant_frequency() of it gives the peer's tone;
      rtcp_stats(): the last RTCP report (CALL_RTCP events, every ~5 s).
    """

    def __init__(
        self,
        tmp_path: Path,
        name: str = "ua",
        *,
        sip_port: int = 0,
        user: str | None = None,
        password: str | None = None,
        auto_answer: bool = True,
        video: bool = True,
        video_codecs: Sequence[str] | None = ("H264",),
        audio_codecs: Sequence[str] | None = ("PCMU",),
        tone_hz: int = 440,
        video_size: tuple[int, int] = (352, 288),
        fps: float = 15.0,
        video_bitrate: int = 500_000,
        sip_trace: bool = False,
        verbose: bool = True,
        extra_config: Mapping[str, str] | None = None,
        account_params: Mapping[str, str] | None = None,
    ) -> None:
        if _missing_baresip:
            raise BaresipError(_missing_baresip)
        self.name = name
        self.dir = Path(tmp_path) / f"baresip-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.user = user or name
        self.password = password
        self.sip_port = sip_port or free_sip_port()   # and sip_port + 1: SIP over TLS
        self.ctrl_port = free_port(udp=False, tcp=True)
        self.video = video
        self.tone_hz = tone_hz
        self._argv = [BARESIP or "baresip", "-f", str(self.dir)]
        if verbose:
            self._argv.append("-v")
        if sip_trace:
            self._argv.append("-s")
        self._write_config(auto_answer, video, video_codecs, audio_codecs, tone_hz, video_size, fps,
                           video_bitrate, extra_config or {}, account_params or {})

        self._tokens = itertools.count(1)
        self._lock = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._taken: set[int] = set()
        self._responses: dict[str, dict[str, Any]] = {}
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._snap = itertools.count(1)
        self.calls: dict[str, str] = {}  # call id -> last lifecycle event type

        self.proc = subprocess.Popen(
            self._argv, cwd=self.dir, env={**os.environ, "HOME": str(self.dir)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._out = _Tail(self.proc.stdout)
        try:
            self._connect(timeout=10.0)
        except BaseException:
            self.stop()
            raise

    # -- setup ----------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """Where to call this agent."""
        return f"sip:{self.user}@{LOOPBACK}:{self.sip_port}"

    def _write_config(self, auto_answer: bool, video: bool, video_codecs: Sequence[str] | None,
                      audio_codecs: Sequence[str] | None, tone_hz: int, video_size: tuple[int, int],
                      fps: float, video_bitrate: int, extra: Mapping[str, str],
                      account_params: Mapping[str, str]) -> None:
        audio_mods = sorted({_AUDIO_MODULES[c.split("/")[0].upper()] for c in audio_codecs}) if audio_codecs \
            else ["g711", "opus"]
        video_mods: list[str] = []
        if video:
            video_mods = (sorted({_VIDEO_MODULES[c.upper()] for c in video_codecs}) if video_codecs
                          else ["avcodec", "vp8"])
        conf: list[tuple[str, str]] = [
            ("poll_method", "epoll"),
            ("sip_listen", f"{LOOPBACK}:{self.sip_port}"),
            ("net_interface", LOOPBACK),
            ("call_local_timeout", "120"),
            ("call_max_calls", "4"),
            # no sound card: audio goes out of ausine and into aubridge's "nil" device, which
            # never plays; sndfile (an audio filter) records what was decoded
            ("audio_player", "aubridge,nil"),
            ("audio_alert", "aubridge,nil"),
            ("audio_source", f"ausine,{tone_hz}"),
            ("ausrc_srate", "48000"),
            ("ausrc_channels", "2"),
            ("auplay_srate", "48000"),
            ("auplay_channels", "2"),
            ("snd_path", "."),
            # its RTP binds random ports of this range (its default, 1024-49152, takes in the ports
            # tests/ports.py hands out for other peers to bind a moment later)
            ("rtp_ports", f"{EPHEMERAL[0]}-{EPHEMERAL[1]}"),
            ("rtp_stats", "yes"),
            ("ringback_disabled", "yes"),
            ("menu_bell", "no"),
            ("module_path", str(BARESIP_MODULES)),
        ]
        conf += [("module", f"{m}.so") for m in audio_mods]
        conf += [("module", "aubridge.so"), ("module", "ausine.so"), ("module", "sndfile.so")]
        if video:
            w, h = video_size
            conf += [("video_source", "fakevideo,nil"), ("video_display", "fakevideo,nil"),
                     ("video_size", f"{w}x{h}"), ("video_fps", f"{fps:.2f}"),
                     ("video_bitrate", str(video_bitrate))]
            conf += [("module", f"{m}.so") for m in video_mods]
            conf += [("module", "fakevideo.so"), ("module", "snapshot.so")]
        conf += [("module_tmp", "account.so"), ("module_app", "menu.so"), ("module_app", "ctrl_tcp.so"),
                 ("ctrl_tcp_listen", f"{LOOPBACK}:{self.ctrl_port}")]
        conf += list(extra.items())
        (self.dir / "config").write_text("".join(f"{k}\t{v}\n" for k, v in conf))

        params = {"regint": "0", "answermode": "auto" if auto_answer else "manual"}
        if self.password is not None:
            params["auth_pass"] = self.password
        if audio_codecs:
            params["audio_codecs"] = ",".join(audio_codecs)
        if video and video_codecs:
            params["video_codecs"] = ",".join(video_codecs)
        params.update(account_params)
        line = f"<sip:{self.user}@{LOOPBACK}>" + "".join(f";{k}={v}" for k, v in params.items())
        (self.dir / "accounts").write_text(line + "\n")
        (self.dir / "contacts").write_text("")

    def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BaresipError(f"baresip {self.name} exited with {self.proc.returncode}\n{self.log()}")
            try:
                sock = socket.create_connection((LOOPBACK, self.ctrl_port), timeout=1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BaresipError(f"baresip {self.name}: no ctrl_tcp on {self.ctrl_port}\n{self.log()}") from None
                time.sleep(0.05)
        sock.settimeout(None)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, args=(sock,), daemon=True)
        self._reader.start()

    # -- control --------------------------------------------------------------------------

    def _read_loop(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while True:
                colon = buf.find(b":")
                if colon < 0:
                    break
                try:
                    size = int(buf[:colon])
                except ValueError:  # out of step: drop what we have
                    buf = b""
                    break
                if len(buf) < colon + 1 + size + 1:
                    break
                payload = buf[colon + 1:colon + 1 + size]
                buf = buf[colon + 2 + size:]
                try:
                    msg = json.loads(payload)
                except json.JSONDecodeError:
                    continue
                self._dispatch(msg)
        with self._lock:
            self._lock.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if msg.get("response"):
                self._responses[str(msg.get("token"))] = msg
            elif msg.get("event"):
                msg["t"] = time.monotonic()
                self._events.append(msg)
                if msg.get("type") in _CALL_STATES and msg.get("id"):
                    self.calls[msg["id"]] = msg["type"]
            self._lock.notify_all()

    def command(self, name: str, params: str | None = None, timeout: float = 5.0) -> str:
        """Run a baresip command (the long name: dial, hangup, accept, video_debug, ...)."""
        if self._sock is None:
            raise BaresipError("not connected")
        token = str(next(self._tokens))
        req: dict[str, str] = {"command": name, "token": token}
        if params is not None:
            req["params"] = params
        payload = json.dumps(req).encode()
        self._sock.sendall(str(len(payload)).encode() + b":" + payload + b",")
        deadline = time.monotonic() + timeout
        with self._lock:
            while token not in self._responses:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise BaresipError(f"baresip {self.name}: no answer to {name!r}\n{self.log()}")
                self._lock.wait(left)
            resp = self._responses.pop(token)
        if not resp.get("ok"):
            raise BaresipError(f"baresip {self.name}: {name} {params or ''} failed: {resp.get('data')}")
        return str(resp.get("data", ""))

    def dial(self, uri: str) -> None:
        self.command("dial", uri)

    def hangup(self) -> None:
        self.command("hangup")

    def accept(self) -> None:
        self.command("accept")

    def reinvite(self) -> None:
        self.command("reinvite")

    # -- events ---------------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def wait_event(self, type_: str, timeout: float = 10.0, **match: str) -> dict[str, Any]:
        """The oldest event of this type (and these field values) not returned before.

        Types (baresip 1.0): CALL_INCOMING (only with auto_answer=False: an auto-answered call
        goes straight to CALL_ESTABLISHED, direction "incoming"), CALL_RINGING, CALL_PROGRESS, CALL_ESTABLISHED,
        CALL_CLOSED (param: the reason, e.g. "Connection reset by peer" or "401 Unauthorized"),
        CALL_RTPESTAB (param audio|video: first RTP received), CALL_RTCP (param audio|video,
        with rtcp_stats), CALL_LOCAL_SDP / CALL_REMOTE_SDP (param offer|answer), REGISTER_*,
        CALL_DTMF_START/END, EXIT.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for i, ev in enumerate(self._events):
                    if i in self._taken or ev.get("type") != type_:
                        continue
                    if all(ev.get(k) == v for k, v in match.items()):
                        self._taken.add(i)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.2))
        seen = [(e.get("type"), e.get("param")) for e in self.events if e.get("type") != "CALL_RTCP"]
        raise TimeoutError(f"baresip {self.name}: no {type_} {match or ''} in {timeout}s; events {seen}\n"
                           f"{self.log()}")

    def call_established(self) -> bool:
        """True while some call's last lifecycle event is CALL_ESTABLISHED (not closed since)."""
        with self._lock:
            return any(state == "CALL_ESTABLISHED" for state in self.calls.values())

    def rtcp_stats(self, media: str = "video") -> dict[str, Any] | None:
        """The latest RTCP report baresip got for this media (rtcp_stats: tx/rx sent, lost, jit)."""
        for ev in reversed(self.events):
            if ev.get("type") == "CALL_RTCP" and ev.get("param") == media:
                return dict(ev.get("rtcp_stats") or {})
        return None

    # -- observations ---------------------------------------------------------------------

    def video_stats(self) -> VideoStats:
        return parse_video_debug(self.command("video_debug"))

    def wait_video_frames(self, count: int = 10, timeout: float = 10.0) -> VideoStats:
        """Wait until `count` pictures were decoded (vidisp frames) in the current call."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.video_stats()
            if stats.rx_frames >= count:
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"baresip {self.name}: {stats.rx_frames} frames decoded, wanted {count}\n"
                                   f"{stats.raw}\n{self.log()}")
            time.sleep(0.2)

    def snapshot(self, received: bool = True, timeout: float = 5.0) -> Path:
        """Save the next decoded (received=True) or encoded-source picture as PNG; its path."""
        name = f"snap-{'recv' if received else 'send'}-{next(self._snap)}.png"
        self.command("snapshot_recv" if received else "snapshot_send", name)
        path = self.dir / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists() and path.read_bytes()[-8:-4] == b"IEND":
                return path
            time.sleep(0.05)
        raise TimeoutError(f"baresip {self.name}: no picture saved to {path} (no frame decoded?)\n{self.log()}")

    def remote_picture(self, path: Path | None = None, timeout: float = 5.0) -> np.ndarray:
        """A decoded remote picture as an RGB uint8 array (height, width, 3)."""
        import cv2

        png = path or self.snapshot(received=True, timeout=timeout)
        img = cv2.imread(str(png), cv2.IMREAD_COLOR)
        if img is None:
            raise BaresipError(f"cannot read {png}")
        return np.ascontiguousarray(img[:, :, ::-1])

    def audio_dumps(self, decoded: bool = True) -> list[Path]:
        suffix = "dec" if decoded else "enc"
        return sorted(self.dir.glob(f"dump-*-{suffix}.wav"), key=lambda p: p.stat().st_mtime)

    def received_audio(self) -> tuple[int, np.ndarray]:
        """(rate, mono float samples) of the newest decoded-audio dump (the call's audio as heard)."""
        dumps = self.audio_dumps(decoded=True)
        if not dumps:
            raise BaresipError(f"baresip {self.name}: no decoded audio dump (no audio call yet?)")
        return read_wav(dumps[-1])

    # -- process --------------------------------------------------------------------------

    def log(self, limit: int = 20000) -> str:
        text = _STATUS_LINE.sub("", self._out.text())
        return f"--- baresip {self.name} ({' '.join(self._argv)}) ---\n{text[-limit:]}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 3.0) -> int:
        """SIGTERM: baresip hangs its calls up (BYE) and closes its WAV dumps; a second SIGTERM
        after `timeout` makes it exit without waiting for the BYE transactions; then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait(5)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._out.join(2)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: the agent vanishes without a BYE (its peer's call stays up until it notices)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.stop()

    def __enter__(self) -> Baresip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# media checks


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    """16-bit PCM WAV as (rate, mono float in [-1, 1]); tolerates a file still being written."""
    data = Path(path).read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    pos, rate, channels, bits = 12, 0, 1, 16
    samples = b""
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:]
        if cid == b"fmt ":
            _, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
        elif cid == b"data":
            samples = body if size in (0, 0xFFFFFFFF) or size > len(body) else body[:size]
            break
        pos += 8 + size + (size & 1)
    if bits != 16:
        raise ValueError(f"{path}: {bits}-bit samples")
    frame = 2 * channels
    pcm = np.frombuffer(samples[:len(samples) - len(samples) % frame], dtype="<i2").astype(np.float32) / 32768
    return rate, pcm.reshape(-1, channels).mean(axis=1)


def dominant_frequency(samples: np.ndarray, rate: int, skip_s: float = 0.2) -> float:
    """The strongest frequency (Hz) in the signal, ignoring its first `skip_s` seconds."""
    x = samples[int(skip_s * rate):]
    if len(x) < rate // 10:
        raise ValueError(f"only {len(x)} samples")
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def fakevideo_bars(img: np.ndarray) -> list[tuple[int, int, int]]:
    """Mean RGB of the middle of each third of the picture (fakevideo: red | green | blue)."""
    h, w = img.shape[:2]
    out = []
    for i in range(3):
        x0, x1 = i * w // 3, (i + 1) * w // 3
        pad = (x1 - x0) // 5
        region = img[h // 10: h - h // 10, x0 + pad: x1 - pad].reshape(-1, 3)
        r, g, b = region.mean(axis=0)
        out.append((int(r), int(g), int(b)))
    return out


def looks_like_fakevideo(img: np.ndarray, tolerance: int = 60) -> bool:
    """True when the picture shows baresip fakevideo's red, green and blue vertical bars."""
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    return all(max(abs(a - b) for a, b in zip(got, want)) <= tolerance
               for got, want in zip(fakevideo_bars(img), expected))


# ---------------------------------------------------------------------------------------
# SIPp


@dataclass
class SippResult:
    rc: int  # 0: every call succeeded; 1: some failed; 97/99/255/254: see `man sipp`
    stdout: str
    stderr: str
    stats: dict[str, int]  # successful, failed, created (cumulative call counters)
    workdir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.stats.get("failed", 0) == 0 and self.stats.get("successful", 0) > 0

    def file(self, name: str) -> str:
        p = self.workdir / name
        return p.read_text(errors="replace") if p.exists() else ""

    @property
    def messages(self) -> str:
        """Every SIP message sent and received (-trace_msg)."""
        return self.file("messages.log")

    @property
    def errors(self) -> str:
        """Unexpected messages and failed checks (-trace_err)."""
        return self.file("errors.log")

    def dump(self, limit: int = 12000) -> str:
        return (f"--- sipp rc={self.rc} stats={self.stats}\n{' '.join(self.argv)}\n"
                f"--- stdout (tail)\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-3000:]}\n"
                f"--- errors.log\n{self.errors[-limit:]}\n--- logs.log\n{self.file('logs.log')[-3000:]}\n"
                f"--- messages.log (tail)\n{self.messages[-limit:]}")


def parse_sipp_stats(stdout: str) -> dict[str, int]:
    stats: dict[str, int] = {}
    for key, label in (("successful", "Successful call"), ("failed", "Failed call"),
                       ("created", "Total Calls created")):
        found = re.findall(rf"{label}\s*\|[^|\n]*\|\s*(\d+)", stdout)
        if found:
            stats[key] = int(found[-1])
    return stats


def scenario_path(scenario: str | Path) -> tuple[str, str]:
    """('-sf', path) for a file or a name in tests/sipp; ('-sn', name) for SIPp's built-ins."""
    p = Path(scenario)
    if p.suffix == ".xml" and p.exists():
        return "-sf", str(p)
    mine = SIPP_SCENARIOS / (p.name if p.suffix == ".xml" else f"{p.name}.xml")
    if mine.exists():
        return "-sf", str(mine)
    return "-sn", str(scenario)


class SippProcess:
    """A SIPp instance running in the background (a UAS waiting for calls, or a long UAC)."""

    def __init__(
        self,
        scenario: str | Path,
        target: str | None = None,
        *,
        local_port: int = 0,
        media_port: int = 0,
        calls: int = 1,
        rate: float | None = None,
        user: str | None = None,
        password: str | None = None,
        service: str | None = None,
        keys: Mapping[str, str] | None = None,
        duration_ms: int | None = None,
        extra: Iterable[str] = (),
        timeout: float = 20.0,
        workdir: Path | None = None,
        transport: str = "u1",
    ) -> None:
        extra = list(extra)
        if SIPP is None:
            raise RuntimeError("sipp is not installed")
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sipp-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = local_port or free_port(udp=True, tcp=transport.startswith("t"))
        self.media_port = media_port or free_udp_block(4)
        self.timeout = timeout
        flag, scen = scenario_path(scenario)
        argv = [SIPP]
        if target:
            argv.append(target)
        argv += [flag, scen, "-t", transport, "-i", LOOPBACK, "-p", str(self.port), "-bind_local",
                 "-mi", LOOPBACK, "-mp", str(self.media_port),
                 "-ci", LOOPBACK, "-cp", str(free_port()),
                 "-m", str(calls), "-nostdin",
                 "-timeout", f"{int(timeout)}s", "-timeout_error",
                 "-trace_err", "-error_file", str(self.workdir / "errors.log"),
                 "-trace_msg", "-message_file", str(self.workdir / "messages.log"),
                 "-trace_logs", "-log_file", str(self.workdir / "logs.log"),
                 "-trace_stat", "-stf", str(self.workdir / "stats.csv")]
        if rate is not None:
            argv += ["-r", str(rate)]
        if user is not None:
            argv += ["-au", user]
        if password is not None:
            argv += ["-ap", password]
            if target and service is not None and "-auth_uri" not in extra:
                # SIPp 3.6 puts "sip:<remote ip:port>" in the digest uri by default; make it
                # the Request-URI ([service]@[remote_ip]:[remote_port]) as RFC 3261 expects
                argv += ["-auth_uri", f"{service}@{target}"]
        if service is not None:
            argv += ["-s", service]
        if duration_ms is not None:
            argv += ["-d", str(duration_ms)]
        for k, v in (keys or {}).items():
            argv += ["-key", k, v]
        argv += extra
        self.argv = argv
        self._out = open(self.workdir / "stdout.txt", "wb")  # noqa: SIM115 - closed in wait()
        self._err = open(self.workdir / "stderr.txt", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err)
        self.result: SippResult | None = None

    @property
    def uri_host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def wait_listening(self, timeout: float = 5.0) -> None:
        """Wait until SIPp's SIP socket is bound (UDP: probe by binding the port ourselves)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.wait(0).dump())
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind((LOOPBACK, self.port))
            except OSError:
                return
            finally:
                s.close()
            time.sleep(0.02)
        raise TimeoutError(f"sipp did not bind {self.port}")

    def wait(self, timeout: float | None = None) -> SippResult:
        if self.result is not None:
            return self.result
        try:
            self.proc.wait(self.timeout + 10 if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()
        self._err.close()
        stdout = (self.workdir / "stdout.txt").read_text(errors="replace")
        stderr = (self.workdir / "stderr.txt").read_text(errors="replace")
        rc = self.proc.returncode
        self.result = SippResult(rc=rc if rc >= 0 else 128 - rc, stdout=stdout, stderr=stderr,
                                 stats=parse_sipp_stats(stdout), workdir=self.workdir, argv=self.argv)
        return self.result

    def stop(self) -> SippResult:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # SIPp: dump stats and quit
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(5)

    def __enter__(self) -> SippProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sipp(scenario: str | Path, target: str | None = None, *, local_port: int = 0, media_port: int = 0,
         calls: int = 1, rate: float | None = None, extra: Iterable[str] = (), timeout: float = 20.0,
         **kwargs: Any) -> SippResult:
    """Run SIPp to the end: `scenario` is a tests/sipp name ("uac_av"), an XML path or a built-in
    ("uas", "uac"); `target` is "127.0.0.1:PORT" for a UAC. Keyword extras: user, password
    (-au/-ap, answered to 401/407 by [authentication]), service (-s: the request-URI user),
    keys ({"name": "value"} for -key, used as [name] in scenarios), duration_ms (-d: <pause/>),
    workdir (traces: errors.log, messages.log, logs.log, stats.csv), transport ("u1", "t1")."""
    proc = SippProcess(scenario, target, local_port=local_port, media_port=media_port, calls=calls,
                       rate=rate, extra=extra, timeout=timeout, **kwargs)
    return proc.wait()


@contextlib.contextmanager
def sipp_uas(scenario: str | Path, **kwargs: Any) -> Iterator[SippProcess]:
    """A SIPp UAS listening on 127.0.0.1:proc.port for the duration of the block."""
    proc = SippProcess(scenario, **kwargs)
    try:
        proc.wait_listening()
        yield proc
    finally:
        proc.stop()
